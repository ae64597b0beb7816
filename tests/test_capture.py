"""Sliced layers under graph capture (``paths="by_shape"``), with a capture stand-in
(``tests/capture_standin.py``): a decode forward and a prefill forward are captured once per size,
then replayed with new inputs and fewer real tokens within the captured size; every replay equals
the unsharded model. The default (``paths="agreed"``) syncs with the host inside the op, which
capture refuses; a decision read from Python state is frozen by a replay (the stand-in shows both)."""

import pytest
import torch

import ascend_compile as ac
from ascend_compile.config import ConfigError
from ascend_compile.models import StackShape, build_stack, make_input
from ascend_compile.runtime import state as shardings
from capture_standin import Capture, CaptureError
from ranks import run_fresh, run_ranks

SERIES = ["o_proj", "q_b_proj"]  # o_proj: input cut (all-to-all, reduce-scatter); q_b_proj: output cut
DECODE_TOKENS = 8


def _replays(rank, world, compiled, paths, dump_dir=None):
    torch._dynamo.reset()
    shape = StackShape(layers=4, bias=True)
    ref, model = build_stack(shape), build_stack(shape)
    config = ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=DECODE_TOKENS, paths=paths)
    with torch.device("meta"):  # every buffer from the model's device
        plan = ac.shard_model(model, config)
    graphs = []  # (compiled graph, its inputs): what vLLM captures per size is the compiled graph

    def backend(gm, example_inputs):
        from ascend_compile.backend import ascend_compile_backend

        graph = ascend_compile_backend(gm, example_inputs, {"lowering": "aot_eager", "dump_dir": dump_dir})
        graphs.append((graph, list(example_inputs)))
        return graph

    def run(x):
        if not compiled:
            return model(x)
        torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(x)  # compiles this size
        graph, inputs = graphs[-1]
        at = [i for i, t in enumerate(inputs) if t is x]
        assert len(at) == 1, "the compiled graph's inputs do not hold the forward's input"
        return lambda: graph(*inputs)[0]

    sliced = shardings.of_model(model).slices
    out = {"paths": plan.paths, "sizes": {}}
    for size in (DECODE_TOKENS, 3 * DECODE_TOKENS):  # a decode size, a prefill size
        static = make_input(shape, tokens=size, seed=size)  # the same on every rank: captured sizes agree
        sliced.issued.clear()
        graph = run(static)  # warm-up (compiles), as vLLM runs a size before capturing it
        ahead_uncaptured = sum(line.endswith(" ahead") for line in sliced.issued)
        sliced.issued.clear()
        try:
            with torch.device("meta"):
                captured = Capture(graph) if compiled else Capture(model, static)
        except CaptureError as e:  # raised inside sliced_linear, which closes the group: no other size
            out["sizes"][size] = {"error": str(e)}
            break
        issued = list(sliced.issued)
        replays = []
        for trial, real in enumerate((size, size - 3, 1)):  # fewer real tokens: the rest is padding
            x = make_input(shape, tokens=real, seed=100 * trial + 10 * rank + size)
            static.zero_()
            static[:real].copy_(x)
            got = captured.replay()[:real].clone()
            want = ref(x)
            replays.append({"max_diff": (got - want).abs().max().item(), "scale": want.abs().max().item(),
                            "device": str(got.device)})
        ops = captured.op_names()
        out["sizes"][size] = {"replays": replays, "issued": issued, "ahead_uncaptured": ahead_uncaptured, "item": sum(o.split(".")[1] in ("item", "_local_scalar_dense") for o in ops if o.startswith("aten.")),
                              "collectives": sorted({o for o in ops if o.startswith("dist.")}),
                              "forwards": dict(sliced.forwards)}
    out["captured"] = dict(sliced.captured)
    return out


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_captured_sizes_replay_their_path_and_equal_the_unsharded_model(compiled, tmp_path, capsys):
    results = run_ranks(_replays, 2, compiled, "by_shape", str(tmp_path) if compiled else None)
    if compiled:  # each compiled size's dump names each layer's path and its collectives
        from ascend_compile import cli

        assert cli.main(["explain", "--all-graphs", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert out.count("layout=slices  paths=by_shape  sliced layers=8  slices path up to 8 tokens (its own "
                         "count, the same on every rank)") == 4  # 2 ranks x 2 sizes
        for rank in (0, 1):
            assert f"rank_{rank}" in out
        assert "o_proj[3]" in out and ("input cut  slices path moves 448 B per token, gather path 12288 B; at 8 "
                                       "tokens: slices path, all_to_all (inputs), reduce_scatter (outputs)") in out
        assert "; at 8 tokens: slices path, all_gather (inputs), all_to_all (outputs)" in out  # q_b_proj: output cut
        assert "; at 24 tokens: gather path, all_gather (weight)" in out
    for rank, r in enumerate(results):
        assert r["paths"] == "by_shape"
        decode, prefill = r["sizes"][DECODE_TOKENS], r["sizes"][3 * DECODE_TOKENS]
        for size, got in r["sizes"].items():
            assert "error" not in got, got
            for replay in got["replays"]:  # new inputs, fewer real tokens: the captured path, right numbers
                assert replay["device"] == "cpu"
                assert replay["max_diff"] <= 1e-5 * replay["scale"], (rank, size, replay)
        # the path of each size, fixed by its shape: activations move at the decode size, weights at prefill
        assert decode["issued"][0] == f"by shape -> {DECODE_TOKENS} tokens, slices"
        assert prefill["issued"][0] == f"by shape -> {3 * DECODE_TOKENS} tokens, gather"
        assert all(not line.startswith("gather") for line in decode["issued"])
        # each layer gathered at its use while captured: a captured graph replays alone (vLLM captures each
        # piece on its own), so no gather may be waited in a later one
        assert sum(line.startswith("gather") for line in prefill["issued"]) == 8  # 4 layers x 2 series
        assert not any(line.endswith(" ahead") for line in prefill["issued"]), prefill["issued"]
        # uncaptured, the same forward gathers ahead: o_proj[0] at q_b_proj[0], then layer i + 1 of each series at layer i
        assert prefill["ahead_uncaptured"] == 7
        assert decode["collectives"] == ["dist.all_gather_into_tensor", "dist.all_to_all_single",
                                         "dist.reduce_scatter_tensor"]
        assert prefill["collectives"] == ["dist.broadcast"]  # gather_slices on gloo: one broadcast per rank
        assert decode["item"] == prefill["item"] == 0  # no host sync: nothing agreed at run time
    assert results[0]["sizes"][DECODE_TOKENS]["issued"] == results[1]["sizes"][DECODE_TOKENS]["issued"]
    for r in results:  # each captured size and its path, as the log says at capture
        assert r["captured"] == {DECODE_TOKENS: "slices", 3 * DECODE_TOKENS: "gather"}


def test_the_agreed_path_syncs_with_the_host_and_capture_refuses_it():
    for r in run_fresh(_replays, 2, False, "agreed"):  # every rank: the all-reduce, then .item()
        assert list(r["sizes"]) == [DECODE_TOKENS]
        assert "aten.item.default reads a device value on the host" in r["sizes"][DECODE_TOKENS].get("error", ""), r


# -- the stand-in itself: it runs what was captured, never the Python that chose it ----------------

STATE = {"double": True}


@torch.library.custom_op("capture_demo::scale", mutates_args=())
def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if STATE["double"] else x * 3  # a decision read from Python at every call


@torch.library.custom_op("capture_demo::sync", mutates_args=())
def _sync(x: torch.Tensor) -> torch.Tensor:
    return x * float(x.sum().item())  # a host sync


def test_the_stand_in_freezes_python_decisions_and_refuses_host_syncs():
    x = torch.ones(4)
    captured = Capture(torch.ops.capture_demo.scale, x)
    assert captured.op_names() == ["aten.mul.Tensor"]  # the op's kernel, not the op
    x.copy_(torch.arange(4.0))
    assert torch.equal(captured.replay(), torch.arange(4.0) * 2)  # the new input, through the captured kernel
    STATE["double"] = False
    try:
        eager = torch.ops.capture_demo.scale(x)
        assert torch.equal(eager, torch.arange(4.0) * 3)
        assert not torch.equal(captured.replay(), eager)  # the replay keeps the captured decision
    finally:
        STATE["double"] = True
    with pytest.raises(CaptureError, match=r"aten\.item\.default reads a device value on the host \(a sync\)"):
        Capture(torch.ops.capture_demo.sync, x)


def _unequal_case(rank, world, tokens):
    """Eager forwards with ``paths="by_shape"`` outside vLLM, each rank with ``tokens[rank]`` tokens."""
    shape = StackShape(layers=2)
    ref, model = build_stack(shape), build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=DECODE_TOKENS,
                                                paths="by_shape"))
    x = make_input(shape, tokens=tokens[rank], seed=rank)
    try:
        with torch.device("meta"):  # the check's buffer takes the input's device
            out = model(x)
    except RuntimeError as e:
        return str(e)
    return {"equal": torch.allclose(out, ref(x), atol=1e-5, rtol=1e-5),
            "issued": list(shardings.of_model(model).slices.issued)}


def test_ranks_with_different_token_counts_under_paths_by_shape_raise_together():
    """Outside vLLM and outside capture, one all-reduce at a forward's first sliced layer checks what
    ``paths="by_shape"`` assumes (every rank runs the same token count): ranks with 4 and 6 tokens
    would issue collectives of different sizes; both raise, naming the counts and the fix."""
    for said in run_fresh(_unequal_case, 2, (4, 6)):
        assert isinstance(said, str), said
        assert "run between 4 and 6 tokens in this forward" in said and "set paths='agreed'" in said, said
    for r in run_fresh(_unequal_case, 2, (6, 6)):  # equal counts: the forward runs, as unsharded
        assert r["equal"] and r["issued"][0] == "by shape -> 6 tokens, slices", r["issued"]


def _opaque_capture_case(rank, world, layout):
    """A whole forward captured (vLLM's FULL / FULL_DECODE_ONLY graphs), attention op included: its layers
    are fetched where the op starts (``fetch_layers``), and the ranks call ``q_b_proj`` a different
    number of times (rank 0 a mixed batch: twice; rank 1 decode only: once) on the same padded count."""
    import test_opaque as opaque_model

    ref, model = opaque_model.build(), opaque_model.build()
    extra = {"decode_tokens": 8, "paths": "by_shape"} if layout == "slices" else {}
    ac.shard_model(model, ac.SharedWeightConfig(layers=["q_b_proj", "o_proj", "down_proj"], layout=layout,
                                                wrap_around=False, **extra))
    tokens = 4
    opaque_model.CONTEXT.update(scoped=True, meta={"num_decode_tokens": (2, 4)[rank]})
    static = torch.zeros(tokens, opaque_model.HIDDEN)
    opaque_model.CONTEXT["layers"].clear()
    opaque_model.register(model)
    with torch.device("meta"):  # every buffer from the model's device
        captured = Capture(model, static)
    diffs = []
    for seed in (1, 2, 3):
        x = torch.randn(tokens, opaque_model.HIDDEN, generator=torch.Generator().manual_seed(seed + 10 * rank))
        static.copy_(x)
        got = captured.replay().clone()
        opaque_model.CONTEXT["layers"].clear()
        opaque_model.register(ref)
        want = ref(x)
        diffs.append((got - want).abs().max().item())
    return {"diffs": diffs, "calls": model.layers[0].impl.calls, "collectives": sorted(
        {o for o in captured.op_names() if o.startswith("dist.")})}


@pytest.mark.parametrize("layout", ["layers", "slices"])
def test_a_captured_forward_replays_the_layers_fetched_inside_its_attention_op(layout):
    """The fetch at the op's start is collectives on static buffers: a replay (no Python) repeats
    them, and the layers read inside the op by each rank's own number of calls use them."""
    results = run_fresh(_opaque_capture_case, 2, layout)
    assert [r["calls"] for r in results] == [[(2, 1)], [(1, 1)]]  # captured once; replays run no Python
    for r in results:
        assert max(r["diffs"]) <= (0.0 if layout == "layers" else 1e-5), r["diffs"]
        if layout == "layers":  # the owners' broadcasts, nothing else
            assert r["collectives"] == ["dist.broadcast"], r["collectives"]
        else:  # the op's layers gathered; down_proj (output cut) on the slices path: inputs gathered, outputs back
            assert {"dist.all_gather_into_tensor", "dist.all_to_all_single"} <= set(r["collectives"]), r["collectives"]


# -- compiling for capture: refused with paths="agreed", accepted with "by_shape" ------------------

def _reduce_overhead_case(rank, world, paths):
    torch._dynamo.reset()
    shape = StackShape(layers=2)
    ref, model = build_stack(shape), build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4, paths=paths))
    x = make_input(shape, tokens=4)
    try:  # on CPU Inductor skips the CUDA graphs; the check is the backend's
        got = torch.compile(model, backend="ascend_compile", mode="reduce-overhead")(x)
    except Exception as e:  # Dynamo wraps the backend's error
        return str(e)
    return (got - ref(x)).abs().max().item()


def test_compiling_for_cuda_graphs_needs_paths_by_shape():
    for got in run_ranks(_reduce_overhead_case, 2, "agreed"):
        assert isinstance(got, str) and "CUDA-graph capture would replay" in got and "paths='by_shape'" in got, got
    for got in run_ranks(_reduce_overhead_case, 2, "by_shape"):
        assert isinstance(got, float) and got < 1e-4, got


def test_config():
    assert ac.SharedWeightConfig(layers=["o_proj"], layout="slices").paths == "agreed"
    assert ac.SharedWeightConfig(layers=["o_proj"], layout="slices", paths="by_shape").paths == "by_shape"
    with pytest.raises(ConfigError, match=r"paths must be one of \['agreed', 'by_shape'\], got 'static'"):
        ac.SharedWeightConfig(layers=["o_proj"], layout="slices", paths="static")
    with pytest.raises(ConfigError, match="paths chooses between the two paths of layout='slices'"):
        ac.SharedWeightConfig(layers=["o_proj"], paths="by_shape")


# -- the torchair lowering: ACL graph capture (reduce-overhead, the default) with paths="by_shape" ------

def _torchair_case(rank, world, mode, paths):
    import fake_torchair

    fake_torchair.install()
    try:
        torch._dynamo.reset()
        shape = StackShape(layers=2)
        ref, model = build_stack(shape), build_stack(shape)
        ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=4, paths=paths,
                                                    wrap_around=False))
        compiled = torch.compile(model, backend="ascend_compile", dynamic=False,
                                 options={"lowering": "torchair", "torchair": {"mode": mode}})
        diffs = []
        try:
            for seed in (1, 2, 3):  # captured at the first call, replayed at the next two
                x = make_input(shape, tokens=4, seed=seed)
                diffs.append(((compiled(x) - ref(x)).abs().max() / ref(x).abs().max()).item())
        except Exception as e:  # noqa: BLE001 - the message is checked
            return str(e)
        return {"diffs": diffs, "replays": sum(r["acl_graph"].replays for r in fake_torchair.RECORDED)}
    finally:
        fake_torchair.uninstall()


def test_torchair_captures_sliced_layers_with_paths_by_shape():
    for r in run_ranks(_torchair_case, 2, "reduce-overhead", "by_shape"):
        assert r["replays"] == 2 and max(r["diffs"]) <= 1e-5, r
    for said in run_ranks(_torchair_case, 2, "reduce-overhead", "agreed"):
        assert "the torchair lowering (ACL graph capture) would replay" in said and "paths='by_shape'" in said, said
    for said in run_ranks(_torchair_case, 2, "max-autotune", "by_shape"):
        assert "torchair's GE graph mode (max-autotune) has no converter for ascend_compile::sliced_linear" in said


def test_a_vllm_piece_whose_sliced_layers_lost_their_effect_order_is_refused():
    """``integrations/vllm/pieces.py``'s check, on a piece where a pass dropped the effect token (the
    vLLM engine test runs the pieces that keep it)."""
    from torch import fx

    from ascend_compile.integrations.vllm.pieces import check_piece

    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    g.output(g.call_function(torch.ops.ascend_compile.sliced_linear.default, (x, w, None, "o_proj", 0, "g", 1, 4)))
    with pytest.raises(ConfigError, match=r"calls sliced_linear without its effect token \(\['sliced_linear_default'\]\): a pass "
                                          r"may reorder these calls"):
        check_piece(g)
    empty = fx.Graph()
    empty.output(empty.placeholder("x"))
    assert check_piece(empty) == []  # a piece without sliced layers: nothing to check, nothing dumped
