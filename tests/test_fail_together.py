"""A rank that fails alone never leaves its peers waiting.

Outside a forward (``shard_model``) the ranks exchange "ok, or this error" and every rank raises
together; inside a forward (a one-sided order mismatch, a compile error on one rank) the failing
rank aborts the group, so its peers' broadcasts fail at once with a ``PeerError`` that names it.
Each case runs 2 ranks whose group timeout is far longer than the deadline the test allows.
"""

import time

import pytest
import torch

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ranks import run_fresh

GROUP_TIMEOUT = 600  # what a waiting peer would sit out without the exchange / the abort
DEADLINE = 60  # what each rank may take to raise here


def _timed(fn):
    start = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test asserts on the type and message
        return type(e).__name__, str(e), time.monotonic() - start
    return "no error", "", time.monotonic() - start


def _odd_model_case(rank, world, what):
    import torch.distributed as dist

    from ascend_compile.runtime import groups

    groups.set_timeout(dist.group.WORLD, GROUP_TIMEOUT)
    shape = StackShape(layers=4)
    model = build_stack(shape)
    if rank == 1 and what == "shape":  # one layer of the series differs on this rank only
        model.layers[2].self_attn.o_proj = torch.nn.Linear(shape.heads * shape.head_dim, shape.hidden + 1)
    layers = ["o_proj", "no_such_layer"] if (rank == 1 and what == "name") else ["o_proj"]
    return _timed(lambda: ac.shard_model(model, ac.SharedWeightConfig(layers=layers, prefetch_step=1)))


@pytest.mark.parametrize("what", ["shape", "name"])
def test_shard_model_raises_on_every_rank_when_one_rank_s_model_is_odd(what):
    results = run_fresh(_odd_model_case, 2, what, timeout=120)
    for rank, (kind, msg, seconds) in enumerate(results):
        assert kind == "ConfigError", (rank, kind, msg)
        assert seconds < DEADLINE, (rank, seconds)
    own = results[1][1]
    assert ("mixes different layers" if what == "shape" else "no module of") in own
    peer = results[0][1]
    assert peer.startswith(f"rank 1 of process group "), peer
    assert "failed to plan the sharding, so every rank stops here: ConfigError: " in peer
    assert own in peer  # rank 1's own message, word for word


def _one_sided_case(rank, world, how):
    import torch.distributed as dist

    from ascend_compile.runtime import groups, guard

    torch._dynamo.reset()
    shape = StackShape(layers=4)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    groups.set_timeout(dist.group.WORLD, GROUP_TIMEOUT)
    options = {"lowering": "aot_eager"}
    if rank == 1 and how == "compile_error":
        options["prefetch_step"] = 7  # out of range for 4 layers: a ConfigError while compiling, on rank 1 only
    if rank == 1 and how == "order_mismatch":
        def mismatch(*args, **kwargs):
            raise ac.RankMismatchError("ranks disagree on the collective order (injected on rank 1)")
        guard.check_published = mismatch  # what the graph's order check calls
    fn = torch.compile(model, backend="ascend_compile", options=options)
    x = make_input(shape)
    if rank == 1:
        time.sleep(2)  # rank 0 is inside its first broadcast by now
    return _timed(lambda: fn(x))


@pytest.mark.parametrize("how", ["compile_error", "order_mismatch"])
def test_a_rank_that_stops_inside_a_forward_aborts_the_group_and_its_peer_names_it(how):
    results = run_fresh(_one_sided_case, 2, how, timeout=180, allow_dead=True)
    (s0, (kind0, msg0, seconds0)), (s1, (kind1, msg1, _)) = results
    assert (s0, s1) == ("ok", "ok"), results
    if how == "compile_error":
        assert "out of range" in msg1, msg1
    else:
        assert kind1 == "RankMismatchError", (kind1, msg1)
    assert kind0 == "PeerError", (kind0, msg0)
    assert "Rank 1 (global rank 1) stopped and aborted the group: " in msg0, msg0
    assert ("ConfigError" if how == "compile_error" else "RankMismatchError") in msg0, msg0
    assert seconds0 < DEADLINE, f"rank 0 waited {seconds0:.1f}s (group timeout {GROUP_TIMEOUT}s)"


def _reload_alone_case(rank, world):
    """vLLM's ``reload_weights`` (wrapped by the plugin) failing on rank 1 only: a checkpoint file
    missing on its node. A fake runner: the wrapper needs only ``get_model``."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from ascend_compile.integrations import vllm as integ
    from ascend_compile.runtime import groups

    groups.set_timeout(dist.group.WORLD, GROUP_TIMEOUT)
    torch._dynamo.reset()
    shape = StackShape(layers=4)
    x = make_input(shape)
    ref = build_stack(shape)(x)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    calls = []

    def original(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):  # vLLM 0.23's
        calls.append(type(self.get_model().layers[0].self_attn.o_proj).__name__)  # un-shared while it runs
        if rank == 1:
            raise FileNotFoundError("model-00002-of-00002.safetensors")
        return "reloaded"

    reload_weights = integ.reload_unshared(original)
    runner = SimpleNamespace(get_model=lambda: model)
    failed = _timed(lambda: reload_weights(runner))
    # both ranks stopped at the reload, the layers are shared again: the next forward is the old one
    return {"failed": failed, "calls": calls, "after": torch.equal(model(x), ref),
            "shared": type(model.layers[0].self_attn.o_proj).__name__}


def test_a_reload_that_fails_on_one_rank_raises_on_every_rank():
    results = run_fresh(_reload_alone_case, 2, timeout=120)
    for rank, r in enumerate(results):
        kind, msg, seconds = r["failed"]
        assert seconds < DEADLINE, (rank, r)
        assert r["calls"] == ["Linear"] and r["after"], (rank, r)
        assert r["shared"].startswith("Parametrized"), (rank, r)
    assert results[1]["failed"][:2] == ("FileNotFoundError", "model-00002-of-00002.safetensors")
    kind, msg, _ = results[0]["failed"]
    assert kind == "ShardingError" and msg.startswith("rank 1 of process group "), msg
    assert msg.endswith("failed to reload its weights, so every rank stops here: "
                        "FileNotFoundError: model-00002-of-00002.safetensors"), msg


def _fallback_case(rank, world):
    import logging

    import torch.distributed as dist

    from ascend_compile.runtime import failing, groups

    if rank == 1:  # a group only this rank made: the ranks no longer name a new group alike
        dist.new_group([1], use_local_synchronization=True)
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger(groups.__name__).addHandler(handler)
    shape = StackShape(layers=4)
    x = make_input(shape)
    model = build_stack(shape)
    plan = ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    eager = torch.equal(model(x), build_stack(shape)(x))
    failing.abort_group(plan.group_name, RuntimeError("stopped"))  # the user's group: published, not destroyed
    alive = torch.ones(1)
    dist.all_reduce(alive)
    return {"group": plan.group_name, "world": groups.group_name(dist.group.WORLD), "wrap": plan.wrap_windows,
            "eager": eager, "alive": float(alive), "reason": failing.abort_reason(plan.group_name), "warnings": warnings}


def test_without_a_group_of_its_own_sharing_uses_the_users_and_never_destroys_it():
    for rank, r in enumerate(run_fresh(_fallback_case, 2, timeout=120)):
        assert r["group"] == r["world"] and r["wrap"] == 0 and r["eager"], (rank, r)
        assert any("made different numbers of process groups" in w for w in r["warnings"]), (rank, r)
        assert r["alive"] == 2.0, (rank, r)  # the default group still works on both ranks
        assert r["reason"].startswith("rank ") and "stopped and aborted the group: RuntimeError: stopped" in r["reason"]


def _auto_measure_fails_case(rank, world):
    import ascend_compile as ac
    from ascend_compile.models import StackShape, build_stack
    from ascend_compile.runtime import measure

    if rank == 1:  # after the timed broadcasts, while rank 0 goes on to the exchange of the results
        def broken(*args, **kwargs):
            raise MemoryError("out of memory for the matmul measurement")

        measure.measure_flops_per_s = broken
    try:
        ac.shard_model(build_stack(StackShape(layers=2)),
                       ac.SharedWeightConfig(layers=["o_proj"], prefetch_step="auto", timeout=600))
    except BaseException as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_an_auto_step_measurement_failing_on_one_rank_fails_every_rank_at_once():
    """``prefetch_step="auto"`` (``layout="layers"``) measures the link with collectives at shard time: a
    rank whose measurement fails closes the sharing group, so its peer fails at once (here well inside
    the test's 90 s, with a group timeout of 600 s) naming it, instead of waiting in the exchange."""
    got = run_fresh(_auto_measure_fails_case, 2, timeout=90)
    assert got[1] == "MemoryError: out of memory for the matmul measurement"
    assert got[0] is not None and "PeerError" in got[0] and "rank 1" in got[0].lower(), got[0]
