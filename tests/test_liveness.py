"""Ranks that compile at different calls, dead and silent peers: never a hang, never wrong output.

Every rank here runs the same model on different token counts, so Dynamo compiles (and
recompiles) at different calls on different ranks; only the graph's own broadcasts may talk
to the other rank after ``shard_model``.
"""

import json
import os
import re
import time

import pytest
import torch

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ranks import run_fresh, run_ranks

SERIES = ["o_proj", "q_b_proj"]
# per rank: token counts of successive calls; the ranks see new shapes at different calls
TOKENS = {0: [8, 8, 13, 13, 5, 8, 1], 1: [8, 13, 13, 5, 5, 1, 13]}


def _no_collectives_after_shard(monkeypatch_targets):
    """Make every torch.distributed collective outside a compiled graph raise from now on."""
    import torch.distributed as dist

    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} called after shard_model (outside the graph's schedule)")
        return f

    saved = {}
    for name in monkeypatch_targets:
        saved[name] = getattr(dist, name)
        setattr(dist, name, refuse(name))
    return saved


def _different_calls_case(rank, world, lowering, dynamic, k, dump_root):
    import torch.distributed as dist

    torch._dynamo.reset()
    shape = StackShape(layers=6)
    reference = torch.compile(build_stack(shape), backend=lowering if lowering != "aot_eager" else "aot_eager",
                              dynamic=dynamic)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=k))
    dump = os.path.join(dump_root, f"{lowering}_{dynamic}_{k}")
    fn = torch.compile(model, backend="ascend_compile", dynamic=dynamic,
                       options={"lowering": lowering, "dump_dir": dump})
    names = ["all_gather_object", "all_gather", "barrier", "broadcast", "broadcast_object_list", "all_reduce",
             "gather_object", "scatter_object_list"]
    saved = _no_collectives_after_shard(names)
    rank_dir = os.path.join(dump, f"rank_{rank}")
    try:
        results = []
        for tokens in TOKENS[rank]:
            x = make_input(shape, tokens)
            out, ref = fn(x), reference(x)
            graphs = len([d for d in os.listdir(rank_dir) if d.startswith("graph_")])  # compiled so far
            results.append((tokens, torch.equal(out, ref), float((out - ref).abs().max()), graphs))
    finally:
        for name, f in saved.items():
            setattr(dist, name, f)
    tables = [json.load(open(os.path.join(rank_dir, d, "schedule.json")))
              for d in sorted(os.listdir(rank_dir)) if d.startswith("graph_")]
    return results, [(t["order"], t["prefetch_step"]) for t in tables]


@pytest.mark.parametrize("lowering, dynamic, k", [
    ("aot_eager", False, 0), ("aot_eager", False, 1), ("aot_eager", False, "auto"),
    ("aot_eager", None, 1), ("aot_eager", True, "auto"), ("inductor", None, 1),
])
def test_ranks_compiling_at_different_calls_match_the_unsharded_model(lowering, dynamic, k, tmp_path):
    results = run_ranks(_different_calls_case, 2, lowering, dynamic, k, str(tmp_path))
    orders = []
    for rank, (calls, tables) in enumerate(results):
        for tokens, equal, diff, _ in calls:
            assert equal, f"rank {rank}, {tokens} tokens: max |diff| {diff}"
        assert len(tables) >= 2 if dynamic is not True else len(tables) >= 1, f"rank {rank}: {len(tables)} graphs"
        orders += [order for order, _ in tables]
        if k != "auto":
            assert {step for _, step in tables} == {k}
    # every graph of every rank issues the same broadcasts in the same order
    # each layer of each series, and layer 0 of each again: sent for the next forward (wrap-around)
    assert len(orders[0]) == 6 * len(SERIES) + (len(SERIES) if k != 0 else 0)
    assert all(order == orders[0] for order in orders)
    # the ranks compiled at different calls: the calls after which a rank's dump has a new graph, each at
    # a token count that rank had not run before (e.g. dynamic=False: [[0, 2, 4, 6], [0, 1, 3, 5]])
    compiled_at = [[i for i, c in enumerate(calls) if c[3] > (calls[i - 1][3] if i else 0)] for calls, _ in results]
    for rank, at in enumerate(compiled_at):
        assert len(at) >= 2 and at[0] == 0 and all(TOKENS[rank][i] not in TOKENS[rank][:i] for i in at), (rank, at)
    assert compiled_at[0] != compiled_at[1], compiled_at


def _dead_peer_case(rank, world, timeout):
    torch._dynamo.reset()
    shape = StackShape(layers=6)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1, timeout=timeout))
    x = make_input(shape)
    if rank == 1:  # runs eagerly (the same broadcasts in the same order) and dies inside layer 3
        model(x)
        model.layers[3].register_forward_pre_hook(lambda *_: os._exit(17))
        model(x)
        return "not reached"
    fn = torch.compile(model, backend="ascend_compile", options={"lowering": "inductor"})
    fn(x)
    return _second_call(fn, x)


def _second_call(fn, x):
    """``(PeerError message or "no error", seconds)`` of one more call of ``fn``."""
    start = time.monotonic()
    try:
        fn(x)
    except ac.PeerError as e:
        return str(e), time.monotonic() - start
    return "no error", time.monotonic() - start


def test_a_rank_killed_mid_forward_makes_the_other_fail_with_the_layer():
    results = run_fresh(_dead_peer_case, 2, 60, timeout=240, allow_dead=True)
    assert results[1] == ("died", 17)
    status, (msg, seconds) = results[0]
    assert status == "ok", results[0]
    assert msg.startswith("compiled graph "), msg
    # layers 0..2 were fetched; the rank died before joining layer 3's broadcasts
    assert re.search(r"failed in the broadcast of (o_proj|q_b_proj)\.(weight|bias)\[3\]", msg), msg
    assert "A peer rank died, or it stopped issuing the same collectives" in msg
    assert seconds < 60, f"the survivor took {seconds:.1f}s to notice"


def _silent_peer_case(rank, world, timeout, lowering):
    from ascend_compile.runtime import groups

    torch._dynamo.reset()
    shape = StackShape(layers=4)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1, timeout=timeout))
    x = make_input(shape)
    fn = torch.compile(model, backend="ascend_compile", options={"lowering": lowering})
    # the first forward waits in its broadcasts for the peer's compile, which on a loaded machine
    # takes longer than this test's short timeout: lift it for that forward only
    ours = groups.group_from_name(ac.get_plan(model).group_name)
    groups.set_timeout(ours, 300)
    fn(x)
    groups.set_timeout(ours, timeout)
    if rank == 1:  # alive, but skips the next forward
        time.sleep(3 * timeout)
        return "skipped", 0.0
    return _second_call(fn, x)


# aot_eager only (the group's timeout bounds the collectives whatever lowered them); a PeerError raised out of
# Inductor's code: test_a_rank_killed_mid_forward_makes_the_other_fail_with_the_layer
@pytest.mark.parametrize("lowering", ["aot_eager"])
def test_a_rank_that_skips_a_forward_makes_the_other_fail_within_the_timeout(lowering):
    timeout = 4
    results = run_fresh(_silent_peer_case, 2, timeout, lowering, timeout=240, allow_dead=True)
    status, (msg, seconds) = results[0]
    assert status == "ok", results[0]
    # layer 0 came from the window the first forward sent (wrap-around): layer 1 is the first
    # broadcast that the silent rank does not join
    assert "failed in the broadcast of o_proj.weight[1]" in msg, msg
    assert f"bounded by SharedWeightConfig(timeout={timeout})" in msg
    assert timeout - 0.5 <= seconds <= 3 * timeout, f"raised after {seconds:.1f}s with a {timeout}s timeout"


def _eager_dead_peer_case(rank, world):
    shape = StackShape(layers=3)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1, timeout=30))
    if rank == 1:
        os._exit(5)
    try:
        model(make_input(shape))
    except ac.PeerError as e:
        return str(e)
    return "no error"


def test_the_eager_marker_names_the_layer_when_a_peer_dies():
    results = run_fresh(_eager_dead_peer_case, 2, timeout=120, allow_dead=True)
    assert results[1] == ("died", 5)
    status, msg = results[0]
    assert status == "ok", results[0]
    assert re.match(r"the broadcast of o_proj\.(weight|bias)\[\d\] from rank \d over process group .* failed", msg), msg


def test_timeout_must_be_positive():
    with pytest.raises(ac.ConfigError, match="timeout must be a number of seconds > 0"):
        ac.SharedWeightConfig(layers=["o_proj"], timeout=0)
    with pytest.raises(ac.ConfigError, match="timeout must be a number of seconds > 0"):
        ac.SharedWeightConfig(layers=["o_proj"], timeout="10")


def test_the_store_is_asked_at_calls_1_2_4_8_until_every_peer_published(monkeypatch):
    import importlib

    from graphs import plan

    guard = importlib.import_module("ascend_compile.runtime.guard")

    asked = []
    answers = iter([False, False, False, True])  # the peers have all published by the 4th lookup
    monkeypatch.setattr(guard, "publish_order", lambda key, rank, order: None)
    monkeypatch.setattr(guard, "check_published", lambda *a: asked.append(calls[0]) or next(answers))
    calls = [0]

    def compiled(x):
        calls[0] += 1
        return x

    from ascend_compile.passes.prefetch import Collective

    g = guard.GuardedGraph(compiled, order=[Collective("o_proj.weight", 0, 0, 4)], key="k", plan=plan(),
                             graph_id="0_0", waits={}, waits_in_order=[])
    for _ in range(20):
        g(1)
    assert asked == [0, 1, 3, 7]  # looked up before calls 1, 2, 4 and 8; verified after that
    assert g.verified and calls[0] == 20
