"""Shared layers read inside an op the compiled graph cannot see, as vLLM-Ascend's ``mla_forward``
reads ``q_b_proj`` and ``o_proj``: fetched once where the op starts (``fetch_layers``), however many
times each rank calls them; refused on every rank, never a hang, without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ascend_compile as ac
from ranks import run_fresh

HIDDEN, Q_LORA, HEADS_DIM = 64, 32, 96
# the op finds its layer by name, as mla_forward does in vLLM's forward_context.no_compile_layers;
# "meta" is the forward's batch split, as attn_metadata: None in a profile or idle dummy run
CONTEXT: dict = {"layers": {}, "meta": None, "scoped": True}


class MLAImpl:
    """Not a module: holds the projections as vLLM-Ascend's ``AscendMLAImpl`` does (``q_proj`` is the
    ``q_b_proj``) and follows its ``forward`` (mla_v1.py, v0.23.0) call by call."""

    def __init__(self, q_proj: nn.Module, o_proj: nn.Module):
        self.q_proj, self.o_proj = q_proj, o_proj
        self.calls = []  # (q_proj calls, o_proj calls) per forward, for the test

    def forward(self, q_c: torch.Tensor, meta, output: torch.Tensor) -> None:
        if CONTEXT["scoped"]:
            with ac.fetch_layers(self.q_proj, self.o_proj):  # where the reference plugin reaches its layers
                self._forward(q_c, meta, output)
        else:
            self._forward(q_c, meta, output)

    def _forward(self, q_c, meta, output):
        if meta is None:  # profile run / an idle rank's dummy batch: no projection is called
            output.zero_()
            self.calls.append((0, 0))
            return
        decode = meta["num_decode_tokens"]
        n = q_c.shape[0]
        parts = []
        if decode > 0:  # mla_preprocess_decode
            parts.append(self.q_proj(q_c[:decode]))
        if decode < n:  # mla_preprocess_prefill
            parts.append(self.q_proj(q_c[decode:]))
        q = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.o_proj.weight  # maybe_prefetch_mla_or_sla_weight_in_current_stream reads it (a slice under slices)
        output.copy_(self.o_proj(F.gelu(q)))  # once, on every token
        self.calls.append((len(parts), 1))


@torch.library.custom_op("ascend_compile_test::mla_forward", mutates_args=["output"])
def mla_forward(q_c: torch.Tensor, output: torch.Tensor, prefix: str) -> None:
    CONTEXT["layers"][prefix].impl.forward(q_c, CONTEXT["meta"], output)


@mla_forward.register_fake
def _(q_c, output, prefix):
    return None


class Layer(nn.Module):
    def __init__(self, i: int):
        super().__init__()
        self.prefix = f"layers.{i}.attn"
        self.q_a_proj = nn.Linear(HIDDEN, Q_LORA, bias=False)
        self.q_b_proj = nn.Linear(Q_LORA, HEADS_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS_DIM, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)  # a shared layer the graph sees
        self.impl = MLAImpl(self.q_b_proj, self.o_proj)

    def forward(self, x):
        out = torch.empty_like(x)
        torch.ops.ascend_compile_test.mla_forward(self.q_a_proj(x), out, self.prefix)
        h = x + out
        return h + self.down_proj(torch.relu(h))


class Model(nn.Module):
    def __init__(self, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(Layer(i) for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = Model()
    for p in model.parameters():
        p.data.normal_(0, p.shape[-1] ** -0.5)
    return model


def register(model: Model) -> None:
    CONTEXT["layers"].update({layer.prefix: layer for layer in model.layers})


# Each rank's batches: (tokens, decode tokens) or None (an idle rank's dummy forward): a mixed batch
# calls q_b_proj twice, a decode-only batch once, a dummy batch not at all.
# Each rank keeps its token count (5 and 3: one compile per rank), as vLLM pads a rank's batch
BATCHES = [
    [(5, 2), (3, 3)],  # rank 0 mixed, rank 1 decode only
    [(5, 5), None],  # rank 1 idle
    [None, (3, 0)],  # rank 0 idle, rank 1 prefill only
    [None, None],  # profile run
]
TOKENS = (5, 3)


def _opaque_forwards(rank, world, layout, compiled, scoped):
    torch._dynamo.reset()
    CONTEXT["layers"].clear()
    CONTEXT["scoped"] = scoped
    ref, model = build(), build()
    extra = {"decode_tokens": 8} if layout == "slices" else {}
    plan = ac.shard_model(model, ac.SharedWeightConfig(layers=["q_b_proj", "o_proj", "down_proj"], layout=layout,
                                                       timeout=60, **extra))
    options = {"lowering": "inductor"}
    run = torch.compile(model, backend="ascend_compile", options=options, dynamic=False) if compiled else model
    want_of = torch.compile(ref, backend="ascend_compile", options=options, dynamic=False) if compiled else ref
    out = []
    for batches in BATCHES:
        batch = batches[rank]
        tokens = TOKENS[rank]
        assert batch is None or batch[0] == tokens
        x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(len(out) + 10 * rank))
        CONTEXT["meta"] = None if batch is None else {"num_decode_tokens": batch[1]}
        CONTEXT["layers"].clear()
        register(model)
        with torch.device("meta"):  # anything that does not take the model's device shows up
            got = run(x)  # (without fetch_layers it raises here, before the reference compiles)
        CONTEXT["layers"].clear()
        register(ref)
        want = want_of(x)
        out.append({"bitwise": torch.equal(got, want), "max_diff": (got - want).abs().max().item(),
                    "device": str(got.device), "calls": model.layers[0].impl.calls[-1]})
    return {"forwards": out, "saved": plan.saved_bytes()}


@pytest.mark.parametrize("layout", ["layers", "slices"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_layers_read_inside_an_opaque_op_a_different_number_of_times_per_rank(layout, compiled):
    results = run_fresh(_opaque_forwards, 2, layout, compiled, True, timeout=240)
    for rank, r in enumerate(results):
        assert r["saved"] > 0
        for i, f in enumerate(r["forwards"]):
            assert f["device"] == "cpu"
            if layout == "layers":  # whole weights, the same GEMMs: bitwise
                assert f["bitwise"], f"rank {rank}, forward {i}: differs by {f['max_diff']}"
            else:  # the visible down_proj computes on slices at decode (partial sums): rounding
                assert f["max_diff"] <= 1e-5, f"rank {rank}, forward {i}: differs by {f['max_diff']}"
    # the pattern the test is about: the ranks called q_b_proj a different number of times
    calls = [[f["calls"] for f in r["forwards"]] for r in results]
    assert calls[0] == [(2, 1), (1, 1), (0, 0), (0, 0)] and calls[1] == [(1, 1), (0, 0), (1, 1), (0, 0)]


@pytest.mark.parametrize("layout", ["layers", "slices"])
def test_an_opaque_read_without_fetch_layers_is_refused_on_every_rank(layout):
    results = run_fresh(_opaque_forwards, 2, layout, True, False, timeout=240, allow_dead=True)
    for rank, (status, detail) in enumerate(results):
        assert status == "error", f"rank {rank}: {status} {detail}"
        assert "OpaqueReadError" in detail and "read by _forward at" in detail, detail
        assert "<- forward <- mla_forward (custom op ascend_compile_test::mla_forward)" in detail, detail[:600]
        assert "inside an op that compiled graph" in detail and "ascend_compile.fetch_layers" in detail
        assert "q_b_proj" in detail  # the first shared layer the op reads


def test_fetch_layers_refuses_a_sliced_layer_that_cannot_be_gathered():
    from ascend_compile.runtime import opaque

    class Gemm(nn.Linear):
        pass

    from ascend_compile.runtime import state

    layer = Gemm(4, 4)
    layer._ascend_compile_slice = ("o_proj", 0, "g", 1, 4)

    class Sliced:
        position = {("o_proj", 0): 0}
        layers = [type("L", (), {"module": "layers.0.o_proj"})()]

        def can_gather(self, pos):
            return False

    setattr(layer, state.ATTR, state.Sharding("g", "g", slices=Sliced()))  # a sliced module reaches its model's state
    with pytest.raises(ac.ConfigError, match=r"layers.0.o_proj is read inside an op .*layout='layers'"):
        with opaque.fetch_layers(layer):
            pass


# -- the vLLM integration's wiring (integrations/vllm/attention.py: no vLLM needed) -----------------


class _Impl:
    """An attention impl as vLLM-Ascend's AscendMLAImpl holds its layers (not a module)."""

    def __init__(self, layer, mlapo=False):
        self.q_proj, self.o_proj, self.kv_b_proj = layer.q_b_proj, layer.o_proj, layer.kv_b_proj
        self.enable_mlapo = mlapo

    def forward(self, x):
        return self.o_proj(self.q_proj(x))


class _Attention(nn.Module):
    def __init__(self, mlapo=False):
        super().__init__()
        self.q_b_proj = nn.Linear(8, 12, bias=False)
        self.o_proj = nn.Linear(12, 8, bias=False)
        self.kv_b_proj = nn.Linear(8, 8, bias=False)
        self.impl = _Impl(self, mlapo)


@pytest.mark.parametrize("layer, mlapo, fragment", [
    ("kv_b_proj", False, "as kv_b_proj: its process_weights_after_loading builds W_UK/W_UV"),
    ("q_b_proj", True, "as q_proj: with enable_mlapo its weights are folded into the fused MLA preprocess op"),
])
def test_layers_an_attention_impl_consumes_at_load_are_refused(layer, mlapo, fragment):
    from ascend_compile.integrations.vllm.attention import check_attention_readers

    model = nn.Sequential(_Attention(mlapo), _Attention(mlapo))
    with pytest.raises(ac.ConfigError, match=fragment) as e:
        check_attention_readers(model, ac.SharedWeightConfig(layers=[layer]))
    assert f"Remove {layer!r} from additional_config['ascend_compile']['shared_weight']['layers']" in str(e.value)
    # what is not consumed at load passes: o_proj always, q_b_proj without mlapo
    check_attention_readers(model, ac.SharedWeightConfig(layers=["o_proj"] + ([] if mlapo else ["q_b_proj"])))


def _wired(rank, world, layout):
    from ascend_compile.integrations.vllm.attention import fetch_in_attention_readers

    torch.manual_seed(0)
    ref = nn.Sequential(_Attention(), _Attention())
    model = nn.Sequential(_Attention(), _Attention())
    model.load_state_dict(ref.state_dict())
    ac.shard_model(model, ac.SharedWeightConfig(layers=["q_b_proj", "o_proj"], layout=layout))
    changed = fetch_in_attention_readers(model)
    again = fetch_in_attention_readers(model)  # wrapped once
    x = torch.randn(3 + rank, 8)
    from ascend_compile.integrations.vllm.attention import READERS_ATTR
    from ascend_compile.runtime.opaque import running_graph

    readers = getattr(model, READERS_ATTR)
    got, ahead = [], []
    with running_graph("test", frozenset()):  # as inside a compiled graph: an unfetched read would raise
        for _ in range(2):  # two forwards
            for m in model:
                got.append(m.impl.forward(x))
                ahead.append(sorted(readers.in_flight))  # op 0 issued op 1's layers; op 1 took them
    want = [m.impl.forward(x) for m in ref] * 2
    try:  # an op entered out of the order every forward calls them
        model[1].impl.forward(x)
        order_error = None
    except ac.ShardingError as e:
        order_error = str(e)
    return {"changed": changed, "again": again, "equal": [torch.equal(g, w) for g, w in zip(got, want)],
            "diff": max((g - w).abs().max().item() for g, w in zip(got, want)), "ahead": ahead,
            "schedule": readers.schedule(), "order_error": order_error}


@pytest.mark.parametrize("layout", ["layers", "slices"])
def test_attention_impls_holding_shared_layers_fetch_them_where_they_start(layout):
    for r in run_fresh(_wired, 2, layout, timeout=120):
        assert r["changed"] == [("0", ["q_proj", "o_proj"]), ("1", ["q_proj", "o_proj"])]
        assert r["again"] == []
        if layout == "layers":
            assert r["equal"] == [True] * 4
        assert r["ahead"] == [[1], [], [1], []]
        assert r["schedule"][1]["fetched"] == "at the start of 0, 1 op(s) ahead"
        assert r["schedule"][0]["fetched"] == "at its start"
        assert "1 started after 1, but the layers of ops are prefetched in the order" in r["order_error"]
        assert r["diff"] <= 1e-6  # slices: the gathered weight is a transposed view (BLAS may round differently)
