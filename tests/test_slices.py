"""layout="slices": equality with the unsharded model on both paths, with different token counts per
rank, the agreed path, memory saved, and the refusals."""

import re

import pytest
import torch
from torch import nn

import ascend_compile as ac
from ascend_compile.config import ConfigError
from ascend_compile.models import StackShape, build_stack, make_input
from ascend_compile.runtime import slice_layout, slice_measure, state as shardings
from ranks import run_fresh, run_ranks

SERIES = ["o_proj", "q_b_proj"]  # o_proj 96 -> 64 (input cut), q_b_proj 32 -> 96 (output cut)


def _forwards(rank, world, decode_tokens, token_counts, compiled, bias):
    """Shard a stack with slices, run forwards with ``token_counts[i][rank]`` tokens, compare each with
    the unsharded model. The default device is meta: a tensor that does not take the model's device
    shows up as an error."""
    torch._dynamo.reset()  # the pool's processes ran other tests' compiles
    shape = StackShape(layers=4, bias=bias)
    ref = build_stack(shape)
    model = build_stack(shape)
    before = ac.parameter_storage_bytes(model)
    with torch.device("meta"):  # sharding too: slices, buffers and agreements on the model's device
        plan = ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=decode_tokens))
    after = ac.parameter_storage_bytes(model)
    run = torch.compile(model, backend="ascend_compile", fullgraph=True, dynamic=False) if compiled else model
    # compiled: against the unsharded model through the same backend (Inductor's fusions round differently)
    want_of = torch.compile(ref, backend="ascend_compile", fullgraph=True, dynamic=False) if compiled else ref
    state = shardings.of_model(model).slices
    out = []
    for counts in token_counts:
        x = make_input(shape, tokens=counts[rank], seed=sum(counts) + rank)
        want = want_of(x)
        state.issued.clear()
        with torch.device("meta"):
            got = run(x)
        out.append({"bitwise": torch.equal(got, want), "close": ((got - want).abs().max() <= 1e-5 * want.abs().max()).item(),  # 1e-5 relative
                    "max_diff": (got - want).abs().max().item(), "path": state.path, "issued": list(state.issued),
                    "device": str(got.device)})
    return {"forwards": out, "saved": before - after, "planned": plan.saved_bytes(), "series": plan.series_bytes(),
            "cuts": sorted({(m.split(".")[-1], getattr(mod, "_ascend_compile_cut"))
                            for m, mod in model.named_modules() if hasattr(mod, "_ascend_compile_cut")})}


def _check(results, world, expect_paths):
    for rank, r in enumerate(results):
        assert r["saved"] == r["planned"] == r["series"] * (world - 1) // world, rank
        assert r["cuts"] == [("o_proj", "input"), ("q_b_proj", "output")]
        for f, path in zip(r["forwards"], expect_paths):
            assert f["path"] == path
            assert f["device"] == "cpu"
            assert f["close"], f"rank {rank}: {path} differs from the unsharded model by {f['max_diff']}"
    # the same collectives on every rank, whatever its own token count
    for i in range(len(expect_paths)):
        assert len({tuple(r["forwards"][i]["issued"]) for r in results}) == 1
        assert results[0]["forwards"][i]["issued"][0].startswith("agree")


# (rank 0's tokens, rank 1's tokens, rank 2's ...) per forward; threshold 8 on the largest
TOKENS = [(3, 1, 2), (1, 300, 5), (40, 9, 1), (8, 8, 8)]
PATHS = ["slices", "gather", "gather", "slices"]


@pytest.mark.parametrize("world", [2, 3])
def test_eager_both_paths_with_different_tokens_per_rank(world):
    results = run_ranks(_forwards, world, 8, TOKENS, False, True)
    _check(results, world, PATHS)
    # (prefill gathers the whole weight exactly, test_reassemble_puts_the_slices_back_together; an input-cut
    # layer multiplies by it transposed, which BLAS may round differently at small batches: not bitwise)
    # decode computes on the slices: no weight gather; prefill gathers every layer once
    decode, prefill = results[0]["forwards"][0]["issued"], results[0]["forwards"][1]["issued"]
    assert not any(e.startswith("gather") for e in decode) and len(decode) == 1 + 8
    # k=1 per series, as layout="layers": layer 0 of both series at the first, then layer i+1 at layer i's use
    assert [e for e in prefill if e.startswith("gather")] == [
        "gather layers.0.self_attn.q_b_proj", "gather layers.0.self_attn.o_proj ahead"] + [
        f"gather layers.{i}.self_attn.{s} ahead" for i in range(1, 4) for s in ("q_b_proj", "o_proj")]


def test_compiled_both_paths():
    results = run_ranks(_forwards, 2, 8, TOKENS, True, False)
    _check(results, 2, PATHS)


def _graph_case(rank, world):
    from ascend_compile.passes.graph import sliced_layers
    from torch._functorch.aot_autograd import aot_module_simplified

    torch._dynamo.reset()
    shape = StackShape(layers=3)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4))
    seen = {}

    def backend(gm, example_inputs):
        seen["dynamo"] = [layer[:2] for layer in sliced_layers(gm.graph)]

        def fw(g, _):
            seen["aot"] = [layer[:2] for layer in sliced_layers(g.graph)]
            seen["effects"] = sum(1 for n in g.graph.nodes if getattr(n.target, "__name__", "") == "with_effects")
            return g

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw)

    torch.compile(model, backend=backend, fullgraph=True)(make_input(shape, tokens=2))
    return seen


def test_graph_holds_the_sliced_layers_in_order_with_effect_tokens():
    seen = run_ranks(_graph_case, 2)[0]
    order = [(s, i) for i in range(3) for s in ("q_b_proj", "o_proj")]
    assert seen["dynamo"] == order
    assert seen["aot"] == order  # after AOTAutograd: every call threaded by the ordered effect's token
    assert seen["effects"] == 6


def _auto_case(rank, world):
    model = build_stack(StackShape(layers=2))
    with torch.device("meta"):  # the timed paths run on the model's device
        plan = ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices"))
    return plan.decode_tokens, plan.decode_explanation


def test_auto_threshold_is_agreed():
    results = run_ranks(_auto_case, 2)
    assert len(set(results)) == 1  # measured on each rank, decided from the slowest: the same everywhere
    threshold, explanation = results[0]
    assert explanation.startswith("1: slices ") and "512: slices" in explanation
    # the threshold is what choose_threshold makes of the measurements it explains: the last candidate of
    # an unbroken run, from 1, whose slices path is no slower than its gather path
    rows = [re.match(r"(\d+): slices ([\d.]+) ms, gather ([\d.]+) ms", r).groups() for r in explanation.split("; ")]
    expect = 0
    for n, on_slices, gathered in rows:
        if float(on_slices) > float(gathered):
            break
        expect = int(n)
    assert threshold == expect, (threshold, explanation)


def test_choose_threshold_picks_the_last_candidate_before_the_slices_path_loses():
    costs = {"slices": {1: 1.0, 2: 1.5, 4: 3.0, 8: 2.0}, "gemm": {1: 0.5, 2: 1.0, 4: 2.0, 8: 4.0},
             "gather": 2.0, "prefetch_step": 1}
    assert slice_measure.choose_threshold(costs)[0] == 2  # 4 loses (3.0 > 2.0); 8 wins again but comes after
    assert slice_measure.choose_threshold(dict(costs, prefetch_step=0))[0] == 8  # no overlap: gathers add to the GEMM
    assert slice_measure.choose_threshold(dict(costs, slices={1: 9.0, 2: 0.1, 4: 0.1, 8: 0.1}))[0] == 0


def test_agree_costs_takes_the_slowest_rank():
    a = {"slices": {1: 1.0}, "gemm": {1: 3.0}, "gather": 1.0, "prefetch_step": 1}
    b = {"slices": {1: 2.0}, "gemm": {1: 1.0}, "gather": 0.5, "prefetch_step": 1}
    assert slice_measure.agree_costs([a, b]) == {"slices": {1: 2.0}, "gemm": {1: 3.0}, "gather": 1.0, "prefetch_step": 1}


@pytest.mark.parametrize("cut", [slice_layout.INPUT_CUT, slice_layout.OUTPUT_CUT])
def test_reassemble_puts_the_slices_back_together(cut):
    w = torch.randn(6, 8) if cut == slice_layout.OUTPUT_CUT else torch.randn(4, 12)
    world = 2
    size = w.shape[cut] // world
    sent = [slice_layout.gather_source(cut, w.narrow(cut, r * size, size)).contiguous() for r in range(world)]
    gathered = torch.cat(sent)
    whole = slice_layout.reassemble(gathered, cut)
    assert torch.equal(whole, w)
    # a view of the gathered buffer, never a copy (for an input cut its transpose: the slices are rows of W.T)
    assert whole.data_ptr() == gathered.data_ptr()
    assert whole.is_contiguous() == (cut == slice_layout.OUTPUT_CUT)
    assert slice_layout.cut_of((64, 96)) == slice_layout.INPUT_CUT and slice_layout.cut_of((96, 32)) == slice_layout.OUTPUT_CUT


class Custom(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class Stack(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"o_proj": make()}) for _ in range(2))


def _refusal_case(rank, world, which):
    makes = {
        "custom": lambda: Custom(8, 4),
        "uneven": lambda: nn.Linear(9, 4),  # input cut, 9 % 2 != 0
        "bias": lambda: nn.Linear(8, 4),
    }
    model = Stack(makes[which])
    params = ["weight", "bias"] if which == "bias" else None
    try:
        ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], layout="slices", decode_tokens=1, params=params))
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("which,message", [
    ("custom", "layers.0.o_proj as x @ W.T \\+ b on a slice of W, but it is a Custom with its own forward"),
    ("uneven", "along its input dimension, 9, which does not divide into 2 ranks"),
    ("bias", "cuts the weight only"),
])
def test_refuses_what_it_cannot_slice(which, message):
    import re

    for got in run_ranks(_refusal_case, 2, which):  # every rank raises: the check is exchanged
        assert got is not None and re.search(message, got), got
        assert "layout='layers'" in got or "params" in got


def test_config():
    cfg = ac.SharedWeightConfig(layers=["o_proj"], layout="slices")
    assert cfg.decode_tokens == "auto" and cfg.wrap_around is False
    with pytest.raises(ConfigError, match="layout must be one of"):
        ac.SharedWeightConfig(layers=["o_proj"], layout="rows")
    with pytest.raises(ConfigError, match="no wrap-around"):
        ac.SharedWeightConfig(layers=["o_proj"], layout="slices", wrap_around=True)
    with pytest.raises(ConfigError, match="decode_tokens must be"):
        ac.SharedWeightConfig(layers=["o_proj"], layout="slices", decode_tokens=-1)
    with pytest.raises(ConfigError, match="drop it or set layout='slices'"):
        ac.SharedWeightConfig(layers=["o_proj"], decode_tokens=4)


def _capture_case(rank, world, lowering, mode):
    shape = StackShape(layers=2)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4))
    try:
        options = None if mode else {"lowering": lowering}  # torch.compile takes mode= or options=, not both
        torch.compile(model, backend="ascend_compile", mode=mode, options=options)(make_input(shape))
    except Exception as e:  # Dynamo wraps the backend's error
        return str(e)
    return None


@pytest.mark.parametrize("lowering,mode,message", [
    ("inductor", "reduce-overhead", "CUDA-graph capture would replay"),
    ("torchair", None, "torchair lowering (ACL graph capture) would replay"),
])
def test_refused_lowerings(lowering, mode, message):
    for got in run_fresh(_capture_case, 2, lowering, mode):
        assert got is not None and message in got, got


def _mismatch_case(rank, world):
    shape = StackShape(layers=2)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4))
    h = make_input(shape, tokens=2)
    model.layers[0](h)  # agree on 2 tokens at the first sliced layer
    try:
        # rank 1 feeds a later sliced layer more tokens than agreed: it aborts, rank 0 fails at once
        model.layers[0].self_attn.o_proj(torch.randn(2 if rank == 0 else 5, 96))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_more_tokens_than_agreed_fails_every_rank():
    got = run_fresh(_mismatch_case, 2, timeout=120)
    assert "more than the 2 its forward agreed on" in got[1]
    assert got[0] is not None and "PeerError" in got[0] and "Rank 1" in got[0], got[0]


def _order_case(rank, world, check, timeout):
    import time

    torch._dynamo.reset()
    shape = StackShape(layers=3)
    ref = build_stack(shape)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4, timeout=timeout))
    if rank == 1:  # this rank calls the layers in another order: its collectives would pair with other layers'
        model.layers = nn.ModuleList(list(model.layers)[::-1])
        ref.layers = nn.ModuleList(list(ref.layers)[::-1])
    fn = torch.compile(model, backend="ascend_compile", fullgraph=True, options={"check_ranks": check})
    x = make_input(shape, tokens=2)
    start = time.monotonic()
    try:
        for _ in range(2):  # the check runs at calls 1, 2, 4, ...: the second call sees every peer's order
            got = fn(x)
    except (ac.RankMismatchError, ac.PeerError) as e:
        return type(e).__name__, str(e), time.monotonic() - start
    return "no error", bool((got - ref(x)).abs().max() <= 1e-5 * ref(x).abs().max()), time.monotonic() - start


def test_ranks_calling_sliced_layers_in_different_orders_raise():
    """Sliced layers called in another order on one rank pair their collectives with other layers'
    (same shapes: nothing notices) until they stop matching and wait for the timeout: without the order check every rank ends in a PeerError after
    the timeout, with it every rank raises at once naming the order (the refusing rank aborts the
    group, so a peer inside a collective fails at once)."""
    unchecked = run_fresh(_order_case, 2, False, 10, timeout=180)
    assert [r[0] for r in unchecked] == ["PeerError", "PeerError"], unchecked
    assert all(r[2] >= 10 for r in unchecked), unchecked  # SharedWeightConfig(timeout=10)
    # checked: a group timeout far above the compile (which the seconds below include, however loaded the machine)
    results = run_fresh(_order_case, 2, True, 120, timeout=300)
    kinds = [kind for kind, _, _ in results]
    assert "RankMismatchError" in kinds and set(kinds) <= {"RankMismatchError", "PeerError"}, results
    for kind, msg, seconds in results:
        if kind == "RankMismatchError":
            assert "ranks disagree on the collective order of compiled graph" in msg, msg
            assert "(sliced layers o_proj[0] (sliced)" in msg or "(sliced layers q_b_proj" in msg, msg
        else:
            assert "aborted the group: RankMismatchError" in msg, msg
        assert seconds < 120  # nobody waited for the group's timeout


def _dump_case(rank, world, dump_dir):
    torch._dynamo.reset()
    shape = StackShape(layers=2)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4))
    torch.compile(model, backend="ascend_compile", options={"dump_dir": dump_dir})(make_input(shape, tokens=2))
    return True


def test_dump_and_explain_show_the_sliced_layers(tmp_path, capsys):
    import json

    from ascend_compile import cli

    run_ranks(_dump_case, 2, str(tmp_path))
    table = json.loads((tmp_path / "rank_1" / "schedule.json").read_text())
    assert table["layout"] == "slices" and table["decode_tokens"] == 4 and table["world_size"] == 2
    rows = {r["layer"]: r for r in table["sliced"]}
    assert list(rows) == ["q_b_proj[0]", "o_proj[0]", "q_b_proj[1]", "o_proj[1]"]
    # o_proj 96 -> 64, input cut: 48 inputs out and 64 partial outputs per token; prefill gathers half of 96 x 64
    assert rows["o_proj[0]"]["cut"] == "input" and rows["o_proj[0]"]["decode_bytes_per_token"] == (48 + 64) * 4
    assert rows["o_proj[0]"]["gather_bytes"] == 96 * 64 * 4 // 2
    assert rows["q_b_proj[0]"]["cut"] == "output" and rows["q_b_proj[0]"]["decode_bytes_per_token"] == (32 + 48) * 4
    assert cli.main(["explain", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layout=slices  paths=agreed  sliced layers=4  slices path up to 4 tokens (the most of any rank)" in out
    assert "o_proj[1]" in out and "input cut  slices path moves 448 B per token, gather path 12288 B" in out


def _update_case(rank, world):
    shape = StackShape(layers=2)
    ref, model = build_stack(shape), build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4))
    # a weight update replaces the layer's parameter: with this rank's slice of the new weight
    new = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))  # the same on every rank
    ref.layers[1].self_attn.o_proj.weight = nn.Parameter(new, requires_grad=False)
    model.layers[1].self_attn.o_proj.weight = nn.Parameter(new[:, rank * 48:(rank + 1) * 48].contiguous(),
                                                         requires_grad=False)
    out = {}
    for tokens in (2, 16):  # decode, then prefill (the gather of o_proj[1] is issued ahead, at o_proj[0])
        x = make_input(shape, tokens=tokens)
        want = ref(x)
        out[tokens] = ((model(x) - want).abs().max() <= 1e-5 * want.abs().max()).item()
    return out


def test_prefill_gathers_the_weights_as_they_are_now():
    for r in run_ranks(_update_case, 2):
        assert r == {2: True, 16: True}


def _fails_alone_case(rank, world):
    shape = StackShape(layers=2)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4))
    try:
        # rank 1's input has the wrong width: its layer raises before the all-to-all rank 0 waits in
        model.layers[0].self_attn.o_proj(torch.randn(2, 96 if rank == 0 else 95))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_an_error_in_a_sliced_layer_fails_every_rank_at_once():
    got = run_fresh(_fails_alone_case, 2, timeout=120)
    assert got[1] is not None and "PeerError" not in got[1], got[1]
    assert got[0] is not None and "PeerError" in got[0] and "Rank 1" in got[0], got[0]


def _measure_fails_case(rank, world):
    if rank == 1:  # this rank's measurement fails half-way, while rank 0 is in the timed collectives
        def broken(*args, **kwargs):
            raise MemoryError("out of memory in the decode measurement")

        slice_measure.decode_linear = broken  # what the measurement calls
    try:
        ac.shard_model(build_stack(StackShape(layers=2)), ac.SharedWeightConfig(layers=SERIES, layout="slices"))
    except BaseException as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_a_measurement_failing_on_one_rank_fails_every_rank():
    got = run_fresh(_measure_fails_case, 2, timeout=120)
    assert got[1] == "MemoryError: out of memory in the decode measurement"
    assert got[0] is not None, "rank 0 finished sharding although its peer failed"


class _Skipping(nn.Module):
    """Sliced layers a forward may skip: ``forward(x, start)`` runs layers ``start..``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({"o_proj": nn.Linear(64, 64, bias=False)}) for _ in range(3))

    def forward(self, x, start: int = 0):
        for i, layer in enumerate(self.layers):
            if i >= start:
                x = torch.tanh(layer["o_proj"](x))
        return x


def _skipping_case(rank, world, compiled):
    torch._dynamo.reset()
    ref, model = _Skipping(), _Skipping()
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], layout="slices", decode_tokens=8))
    run = torch.compile(model, backend="ascend_compile", dynamic=False) if compiled else model
    state = shardings.of_model(model).slices
    out = []
    # a decode forward from the first layer, then a prefill forward that skips it: the prefill forward
    # must agree on its own path at the first sliced layer it calls
    for tokens, start in ((2 + rank, 0), (40 + rank, 1), (3, 1)):
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
        got = run(x, start)
        out.append({"path": state.path, "diff": (got - ref(x, start)).abs().max().item()})
    return out


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_forward_that_skips_the_first_sliced_layer_agrees_on_its_own_path(compiled):
    for r in run_fresh(_skipping_case, 2, compiled, timeout=240, allow_dead=False):
        assert [f["path"] for f in r] == ["slices", "gather", "slices"]
        assert max(f["diff"] for f in r) <= 1e-5


def _all_gather_case(rank, world):
    """The prefill gathers as a device runs them (HCCL, NCCL: ``all_gather_into_tensor``), on gloo."""
    import torch.distributed as dist

    real = dist.all_gather_into_tensor
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    slice_layout.BROADCAST_GATHER_BACKENDS, dist.all_gather_into_tensor = (), counted
    try:
        out = _forwards(rank, world, 8, TOKENS, False, True)
    finally:
        slice_layout.BROADCAST_GATHER_BACKENDS, dist.all_gather_into_tensor = ("gloo",), real
    out["all_gathers"] = len(calls)
    return out


def test_prefill_gathers_through_all_gather_as_on_a_device():
    results = run_fresh(_all_gather_case, 2, timeout=240)
    _check(results, 2, PATHS)
    # two prefill forwards gather 8 layers each through all_gather_into_tensor (the slices path's input
    # all-gathers of the output-cut q_b_proj count too: 4 layers in each of the 2 decode forwards)
    assert results[0]["all_gathers"] == 2 * 8 + 2 * 4


class _ForwardContext:  # vLLM's ForwardContext (a dataclass): one object per forward
    def __init__(self, dp_metadata):
        self.dp_metadata = dp_metadata


def _vllm_count_case(rank, world):
    """Under vLLM with data parallelism a MoE model's forward context carries every DP rank's token count
    (``dp_metadata.num_tokens_across_dp_cpu``): the sliced forward takes its path from it, with no
    collective and no host sync of its own."""
    import sys
    import types

    counts = torch.tensor([3, 40])
    fake = types.ModuleType("vllm.forward_context")
    ctx = {"now": None}
    fake.is_forward_context_available = lambda: ctx["now"] is not None
    fake.get_forward_context = lambda: ctx["now"]
    sys.modules["vllm.forward_context"] = fake
    try:
        torch._dynamo.reset()
        shape = StackShape(layers=2)
        ref, model = build_stack(shape), build_stack(shape)
        ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=8))
        state = shardings.of_model(model).slices
        out = []
        for across in (counts, torch.tensor([3, 5])):
            ctx["now"] = _ForwardContext(types.SimpleNamespace(num_tokens_across_dp_cpu=across))  # one per forward
            x = make_input(shape, tokens=int(across[rank]), seed=rank)
            state.issued.clear()
            got = model(x)
            out.append({"issued": state.issued[0], "path": state.path,
                        "close": bool(((got - ref(x)).abs().max() <= 1e-5 * ref(x).abs().max()).item())})
        return out
    finally:
        sys.modules.pop("vllm.forward_context", None)


def test_under_vllm_a_sliced_forward_takes_the_token_count_vllm_agreed():
    for r in run_fresh(_vllm_count_case, 2, timeout=120):
        assert [f["issued"] for f in r] == ["agree (vLLM's num_tokens_across_dp) -> 40 tokens, gather",
                                           "agree (vLLM's num_tokens_across_dp) -> 5 tokens, slices"]
        assert all(f["close"] for f in r)
