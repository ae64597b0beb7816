"""Prefetch across steps (wrap-around): the first layers of the next forward travel during the
last layers of this one, into windows that whichever compiled graph runs next consumes.

Passes alone on small graphs (op counts, placement, the verifier), then gloo ranks: bitwise
equality over many forwards with graphs of different sizes compiled at different calls on
each rank, an eager forward in between, a weight reload with ``invalidate_prefetch``, and a
rank that forgets to invalidate.
"""

import os
import time

import pytest
import torch

import ascend_compile as ac
from ascend_compile.passes.planning import wrap_around_series
from ascend_compile.models import StackShape, build_stack, make_input
from ascend_compile.passes import ScheduleError, collective_schedule, rewrite_shared_weights, schedule_prefetch, verify_schedule
from ascend_compile.passes.cost_model import CostInputs, choose_prefetch_step, simulate
from ascend_compile.passes.graph import BROADCAST_TARGETS, NEXT, WAIT_TARGETS, role
from ascend_compile.passes.prefetch import collective_order, order_layers
from ascend_compile.runtime.order import order_key
from ascend_compile.runtime.windows import window_targets
from graphs import GROUP, count, stack_graph
from graphs import plan as make_plan
from ranks import run_fresh, run_ranks

SERIES = ["o_proj", "q_b_proj"]
WINDOW = window_targets()


def plan(k, wrap, **kw):
    import dataclasses

    return dataclasses.replace(make_plan(k=k, **kw), wrap=wrap)


def scheduled(n, k, w, series=("o_proj",)):
    p = plan(k, tuple((f"{s}.weight", w) for s in series))
    gm = schedule_prefetch(rewrite_shared_weights(stack_graph(n, series, k), p), p)
    return gm, p


# -- passes ----------------------------------------------------------------------------------------

def test_rewrite_takes_the_first_w_layers_from_windows():
    p = plan(1, (("o_proj.weight", 2),))
    gm = rewrite_shared_weights(stack_graph(5, ("o_proj",), k=1), p)
    assert count(gm, WINDOW["fetch"]) == count(gm, WINDOW["wait"]) == count(gm, WINDOW["next"]) == 2
    assert count(gm, torch.ops._c10d_functional.broadcast.default) == 3  # layers 2..4 as before
    assert count(gm, torch.ops._c10d_functional.wait_tensor.default) == 3
    windows = sorted(n.meta["ascend_compile"]["index"] for n in gm.graph.nodes if n.target is WINDOW["fetch"])
    assert windows == [0, 1]
    assert count(gm, *BROADCAST_TARGETS) == 5 and count(gm, *WAIT_TARGETS) == 5  # one issue + wait per layer


@pytest.mark.parametrize("n, k, w", [(4, 1, 1), (5, 2, 2), (5, 0, 1), (6, 1, 2), (6, 3, 1)])
def test_next_forward_windows_are_sent_during_the_last_layers(n, k, w):
    gm, p = scheduled(n, k, w)
    verify_schedule(gm, p)  # the invariants hold, wrap-around included
    rows = collective_schedule(gm.graph)
    wait_of = {r["index"]: r["wait"] for r in rows if r["kind"] != "next"}
    nxt = [r for r in rows if r["kind"] == "next"]
    assert [r["index"] for r in nxt] == list(range(w))
    for r in nxt:  # window j right after the wait of layer n - w + j, before that layer's use
        assert wait_of[n - w + r["index"]] < r["issue"]
        assert all(r["issue"] < wait_of[i] for i in range(n - w + r["index"] + 1, n))
    assert [r["kind"] for r in rows if r["kind"] != "next"][:w] == ["window"] * w
    # the window fetches sit at graph entry, ahead of any computation
    first_compute = min(i for i, node in enumerate(gm.graph.nodes)
                        if node.op == "call_function" and node.target is torch.ops.aten.mm.default)
    assert all(r["issue"] < first_compute for r in rows if r["kind"] == "window")


def test_order_marks_windows_and_the_next_forward():
    gm, _ = scheduled(4, 1, 1)
    order = collective_order(collective_schedule(gm.graph))
    assert order[0].kind == "window" and order[-1].kind == "next"
    assert str(order[0]).endswith("(window)") and str(order[-1]).endswith("(next step)")  # as dumps show them
    assert [o.layer for o in order] == [f"o_proj.weight[{i}]" for i in (0, 1, 2, 3, 0)]
    plain, _ = scheduled(4, 1, 0)
    plain_order = collective_order(collective_schedule(plain.graph))
    # one key for the same layers and wrap-around setting, whichever layers came from windows: a
    # rank that takes another layer first meets the others' order and is told
    reordered = [order[2], order[1], order[0], order[3], order[4]]
    assert order_layers(order) == order_layers(reordered) == order_layers(plain_order)
    key = order_key(GROUP, 1, order_layers(order), (("o_proj.weight", 1),))
    # with and without wrap-around are two models' settings (several may share a group): two keys
    assert key != order_key(GROUP, 1, order_layers(plain_order), ())
    assert order != plain_order


def test_the_order_does_not_depend_on_the_step():
    orders = {k: collective_order(collective_schedule(scheduled(6, k, 1, ("o_proj", "q_b_proj"))[0].graph))
              for k in range(4)}
    assert all(o == orders[0] for o in orders.values())  # "auto" may pick any k per graph
    # the next forward's windows come after every broadcast of the graph, whatever k
    assert [o.kind == "next" for o in orders[0]] == [False] * 12 + [True] * 2


def test_verifier_refuses_a_next_forward_broadcast_out_of_place():
    gm, p = scheduled(4, 1, 1)
    (nxt,) = [n for n in gm.graph.nodes if role(n) == NEXT]
    anchor = nxt.args[1]
    anchor.prepend(nxt)  # before the wait it must follow: the graph is still valid, the schedule not
    nxt.update_arg(1, nxt.args[0])
    with pytest.raises(ScheduleError, match=r"is not issued right after the wait of o_proj.weight\[3\]"):
        verify_schedule(gm, p)


def test_only_a_graph_holding_a_whole_series_wraps_around():
    both = ("o_proj", "q_b_proj")
    assert wrap_around_series(stack_graph(4, both, k=1, wrap=1).graph) == (("o_proj.weight", 1), ("q_b_proj.weight", 1))
    # the model's o_proj series has 8 layers: this graph holds half of it (a graph break, piecewise):
    # its other graphs and eager forwards would take layers from windows only a whole-series graph sends
    split = stack_graph(4, both, k=1, wrap=1, layers={"o_proj": 8})
    with pytest.raises(ac.ConfigError, match=r"holds 4 of the 8 layers of series 'o_proj.weight'.*fullgraph=True"):
        wrap_around_series(split.graph)
    assert wrap_around_series(stack_graph(4, both, k=1, wrap=0, layers={"o_proj": 8}).graph) == ()
    assert wrap_around_series(stack_graph(4, both, k=1, wrap=0).graph) == ()
    assert wrap_around_series(stack_graph(4, both, k=1, wrap=5).graph) == (("o_proj.weight", 3), ("q_b_proj.weight", 3))


def test_config_switch():
    assert ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=2).wrap_windows() == 2
    assert ac.SharedWeightConfig(layers=["o_proj"], prefetch_step="auto").wrap_windows() == 1
    assert ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=0).wrap_windows() == 0
    assert ac.SharedWeightConfig(layers=["o_proj"], wrap_around=False).wrap_windows() == 0
    with pytest.raises(ac.ConfigError, match="wrap_around must be True or False"):
        ac.SharedWeightConfig(layers=["o_proj"], wrap_around="yes")
    assert ac.SharedWeightConfig.from_dict({"layers": ["o_proj"], "wrap_around": False}).wrap_around is False


def test_cost_model_gains_one_broadcast_per_forward_when_compute_bound():
    base = dict(layers=8, layer_bytes=1000, buffer_bytes=1000, bandwidth=1000 / 0.4, compute_s=1.0)
    plain, wrapped = CostInputs(**base), CostInputs(**base, wrap_windows=1)
    assert simulate(plain, 1) == pytest.approx(8 * 1.0 + 0.4)  # the first layer's broadcast is exposed
    assert simulate(wrapped, 1) == pytest.approx(8 * 1.0)  # it travelled during the previous forward
    assert simulate(wrapped, 0) == pytest.approx(8 * 1.0 + 7 * 0.4)  # k = 0: only layer 0 is hidden
    # memory: max(k, w) + 1 windows during a forward
    assert wrapped.buffers(1) == 2 and wrapped.buffers(0) == 2 and CostInputs(**base, wrap_windows=2).buffers(1) == 3
    tight = CostInputs(**dict(base, memory_budget=2 * 1000), wrap_windows=2)
    assert choose_prefetch_step(tight).k == 0  # 3 windows do not fit: the smallest step
    assert "held between forwards" in choose_prefetch_step(wrapped).explanation


# -- ranks -----------------------------------------------------------------------------------------

# per rank: token counts of successive forwards (static shapes: one graph per size, compiled at
# different calls on each rank); "eager" runs the sharded model without compiling
TOKENS = {0: [8, 8, 13, 5, "eager", 13, 8, 1, 5, 8, 13, 8],
          1: [13, 5, 5, 8, "eager", 1, 13, 8, 8, 5, 13, 1]}


def _steps_case(rank, world, lowering, k, wrap, dump_root):
    import json

    from ascend_compile.runtime import windows

    torch._dynamo.reset()
    shape = StackShape(layers=5, bias=True)
    reference = build_stack(shape)
    ref_compiled = torch.compile(reference, backend=lowering)
    model = build_stack(shape)
    sp = ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=k, wrap_around=wrap))
    dump = os.path.join(dump_root, f"{lowering}_{k}_{wrap}")
    fn = torch.compile(model, backend="ascend_compile", options={"lowering": lowering, "dump_dir": dump})
    equal = []
    for tokens in TOKENS[rank]:
        x = make_input(shape, 3 if tokens == "eager" else tokens)
        if tokens == "eager":
            equal.append(torch.equal(model(x), reference(x)))
        else:
            equal.append(torch.equal(fn(x), ref_compiled(x)))
    orders = []
    rank_dir = os.path.join(dump, f"rank_{rank}")
    for graph in sorted(os.listdir(rank_dir)):
        path = os.path.join(rank_dir, graph, "schedule.json")
        if os.path.exists(path):
            with open(path) as f:
                orders.append(json.load(f)["order"])
    return {"equal": equal, "orders": orders, "in_flight": windows.in_flight(sp.group_name),
            "window_bytes": sp.window_bytes()}


@pytest.mark.parametrize("lowering, k", [("aot_eager", 1), ("aot_eager", 2), ("inductor", 1), ("eager", 1)])
def test_bitwise_over_many_forwards_with_graphs_of_different_sizes(lowering, k, tmp_path):
    results = run_ranks(_steps_case, 2, lowering, k, True, str(tmp_path))
    for rank, r in enumerate(results):
        assert all(r["equal"]), f"rank {rank}: {r['equal']}"
        assert len(r["orders"]) >= 3  # several graphs (one per token count) took each other's windows
        assert all(o == r["orders"][0] for o in r["orders"])
        assert sum(o.endswith("(next step)") for o in r["orders"][0]) == 2 * len(SERIES) * k  # weight + bias
        # after the last forward, the next one's first k layers are in flight
        assert r["in_flight"] == sorted(f"{s}.{p}[{i}]" for s in SERIES for p in ("weight", "bias") for i in range(k))
    assert results[0]["orders"][0] == results[1]["orders"][0]


def test_switched_off_nothing_crosses_forwards(tmp_path):
    results = run_ranks(_steps_case, 2, "aot_eager", 1, False, str(tmp_path))
    for r in results:
        assert all(r["equal"])
        assert r["in_flight"] == [] and r["window_bytes"] == 0
        assert not any("(window)" in o or "(next step)" in o for o in r["orders"][0])


def _set_weights(model, source):
    """Load ``source``'s weights into a sharded ``model`` as a weight update would: the owner of a
    shared parameter writes its real storage, the others have nothing to write."""
    from torch.nn.utils import parametrize

    from ascend_compile.runtime.series import is_standin

    src = dict(source.named_parameters())
    with torch.no_grad():
        for mname, module in model.named_modules():
            if isinstance(module, parametrize.ParametrizationList):
                continue
            for pname, p in module._parameters.items():
                if p is not None:
                    p.copy_(src[f"{mname}.{pname}" if mname else pname])
            if parametrize.is_parametrized(module):
                for pname, plist in module.parametrizations.items():
                    if not is_standin(plist.original):
                        plist.original.copy_(src[f"{mname}.{pname}"])


def _reload_case(rank, world, lowering):
    torch._dynamo.reset()
    shape = StackShape(layers=4)
    old, new = build_stack(shape, seed=0), build_stack(shape, seed=7)
    ref_old, ref_new = torch.compile(old, backend=lowering), torch.compile(new, backend=lowering)
    model = build_stack(shape, seed=0)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1))
    fn = torch.compile(model, backend="ascend_compile", options={"lowering": lowering})
    x = make_input(shape, 6)
    before = [torch.equal(fn(x), ref_old(x)) for _ in range(3)]
    _set_weights(model, new)
    dropped = ac.invalidate_prefetch(model)
    after = [torch.equal(fn(x), ref_new(x)) for _ in range(3)]
    # without invalidating, the next forward would use layer 0 as it was sent before the update
    _set_weights(model, old)
    stale = fn(x)
    ac.invalidate_prefetch(model)
    fresh = fn(x)
    return {"before": before, "after": after, "dropped": dropped, "stale_differs": not torch.equal(stale, ref_old(x)),
            "fresh": torch.equal(fresh, ref_old(x))}


@pytest.mark.parametrize("lowering", ["aot_eager", "inductor"])
def test_weight_update_with_invalidate_prefetch(lowering):
    for rank, r in enumerate(run_ranks(_reload_case, 2, lowering)):
        assert r["before"] == [True] * 3 and r["after"] == [True] * 3, (rank, r)
        assert r["dropped"] == ["o_proj.weight[0]", "q_b_proj.weight[0]"]
        assert r["stale_differs"], "the test would not see a missing invalidation"
        assert r["fresh"]


def _forgotten_invalidate_case(rank, world):
    from ascend_compile.runtime import windows

    windows.INVALIDATE_WAIT_S = 5.0
    torch._dynamo.reset()
    shape = StackShape(layers=4)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1, timeout=10))
    fn = torch.compile(model, backend="ascend_compile", options={"lowering": "aot_eager"})
    x = make_input(shape, 4)
    fn(x)
    if rank == 0:
        ac.invalidate_prefetch(model)
    start = time.monotonic()
    try:
        fn(x)
    except (ac.RankMismatchError, ac.PeerError) as e:
        return type(e).__name__, str(e), time.monotonic() - start
    return "no error", "", time.monotonic() - start


def test_a_rank_that_does_not_invalidate_is_named_not_paired_wrongly():
    results = run_fresh(_forgotten_invalidate_case, 2, timeout=120)
    kind0, msg0, _ = results[0]
    assert kind0 == "RankMismatchError", results
    assert "rank(s) [1] did not" in msg0 and "invalidate_prefetch on every rank" in msg0
    kind1, msg1, seconds = results[1]
    assert kind1 == "PeerError", results  # it went on and waits for a broadcast rank 0 never issues
    assert seconds < 60


def _two_models_case(rank, world, dump_root):
    import json

    torch._dynamo.reset()
    shape = StackShape(layers=4)
    refs, fns = [], []
    for seed, wrap in ((0, True), (5, False)):  # two models with the same layer names over one group
        refs.append(torch.compile(build_stack(shape, seed=seed), backend="aot_eager"))
        model = build_stack(shape, seed=seed)
        ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1, wrap_around=wrap))
        fns.append(torch.compile(model, backend="ascend_compile",
                                 options={"lowering": "aot_eager", "dump_dir": os.path.join(dump_root, str(seed))}))
    x = make_input(shape, 5)
    equal = [torch.equal(fns[i](x), refs[i](x)) for i in (0, 1, 0, 0, 1, 1, 0)]
    orders = []
    for seed in (0, 5):
        with open(os.path.join(dump_root, str(seed), f"rank_{rank}", "schedule.json")) as f:
            orders.append(json.load(f)["order"])
    return equal, orders


def test_two_models_over_one_group_keep_their_own_windows_and_settings(tmp_path):
    for equal, (wrapped, plain) in run_ranks(_two_models_case, 2, str(tmp_path)):
        assert equal == [True] * 7
        # the second model's wrap_around=False does not switch the first one's off: each carries its own
        assert sum(o.endswith("(next step)") for o in wrapped) == len(SERIES)
        assert not any("(" in o for o in plain)


# -- eager forwards beside compiled ones (one rank eager, the other compiled) ----------------------

# per rank, what runs each forward: "c" the compiled model, "e" the sharded model eagerly
PATTERNS = {0: "cecec", 1: "ccccc"}


def _eager_beside_compiled_case(rank, world, k, lowering):
    torch._dynamo.reset()
    shape = StackShape(layers=5)
    reference = build_stack(shape)
    model = build_stack(shape)
    sp = ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=k, timeout=60))
    fn = torch.compile(model, backend="ascend_compile", fullgraph=True, options={"lowering": lowering})
    diffs = []
    for step, how in enumerate(PATTERNS[rank]):
        x = make_input(shape, 4 + step)
        out = (fn if how == "c" else model)(x)
        diffs.append((out - reference(x)).abs().max().item())
    from ascend_compile.runtime import windows

    return {"diffs": diffs, "in_flight": windows.in_flight(sp.group_name)}


@pytest.mark.parametrize("k", [1, 2])
def test_an_eager_forward_takes_and_sends_the_windows_as_a_compiled_one(k):
    results = run_fresh(_eager_beside_compiled_case, 2, k, "aot_eager", timeout=240)
    for rank, r in enumerate(results):
        # the eager marker computes the same matmuls on the same fetched weights: equal up to the
        # compiled graph's own rounding (without windows, rank 1 was 1.38 off with k=1)
        assert max(r["diffs"]) < 1e-5, (rank, r["diffs"])
        assert r["in_flight"] == sorted(f"{s}.weight[{i}]" for s in SERIES for i in range(k)), (rank, r)


def _eager_only_case(rank, world):
    from ascend_compile.runtime import windows

    shape = StackShape(layers=3)
    reference, model = build_stack(shape), build_stack(shape)
    sp = ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    x = make_input(shape, 3)
    equal = [torch.equal(model(x), reference(x)) for _ in range(3)]
    return equal, windows.in_flight(sp.group_name)


def test_eager_forwards_alone_keep_the_windows_going():
    for equal, in_flight in run_ranks(_eager_only_case, 2):
        assert equal == [True] * 3  # the eager marker's own broadcasts: bitwise
        assert in_flight == ["o_proj.weight[0]"]


def test_a_graph_holding_part_of_a_wrapped_series_is_refused():
    part = stack_graph(3, wrap=1, layers={"o_proj": 4})  # the markers say: 4 layers, 1 window; the graph holds 3
    with pytest.raises(ac.ConfigError, match=r"holds 3 of the 4 layers of series 'o_proj.weight'.*wrap_around=False"):
        wrap_around_series(part.graph)
    assert wrap_around_series(stack_graph(3, wrap=0, layers={"o_proj": 4}).graph) == ()  # without wrap-around: fine
    assert wrap_around_series(stack_graph(4, wrap=1).graph) == (("o_proj.weight", 1),)  # whole: wrapped


def test_wrap_around_defaults_off_where_torchair_is_the_default_lowering(monkeypatch):
    from ascend_compile import config

    monkeypatch.setattr(config, "default_lowering", lambda: "torchair")
    assert ac.SharedWeightConfig(layers=["o_proj"]).wrap_around is False
    assert ac.SharedWeightConfig(layers=["o_proj"], wrap_around=True).wrap_around is True
    monkeypatch.setattr(config, "default_lowering", lambda: "inductor")
    assert ac.SharedWeightConfig(layers=["o_proj"]).wrap_around is True


def _drain_case(rank, world):
    from ascend_compile.runtime import windows

    pending = torch._C._distributed_c10d._get_work_registry_size  # collectives issued and not yet waited for
    torch._dynamo.reset()
    shape = StackShape(layers=4)
    x = make_input(shape)
    ref = build_stack(shape)(x)
    model = build_stack(shape)
    sp = ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    fn = torch.compile(model, backend="ascend_compile", options={"lowering": "aot_eager"})
    before = pending()
    outs = [fn(x)]
    sent = pending() - before
    drained = ac.drain_prefetch(model) if rank == 1 else []  # one rank alone: nothing to agree on
    left = pending() - before
    outs += [fn(x) for _ in range(2)]  # the drained window still feeds the next forward
    last = windows.in_flight(sp.group_name)
    done = ac.drain_prefetch(model)
    return {"sent": sent, "drained": drained, "left": left, "equal": [torch.equal(o, ref) for o in outs],
            "last": last, "done": done, "after": pending() - before}


def test_drain_prefetch_waits_for_the_windows_in_flight_and_keeps_them():
    results = run_ranks(_drain_case, 2)
    for rank, r in enumerate(results):
        assert r["equal"] == [True] * 3, (rank, r)
        assert r["sent"] == 1, (rank, r)  # the next forward's o_proj.weight[0], broadcast and not waited for
        assert r["left"] == (0 if rank == 1 else 1), (rank, r)
        assert r["drained"] == (["o_proj.weight[0]"] if rank == 1 else []), (rank, r)
        assert r["last"] == r["done"] == ["o_proj.weight[0]"] and r["after"] == 0, (rank, r)


def test_drain_prefetch_needs_a_sharded_model():
    with pytest.raises(ac.ShardingError, match="Linear is not sharded: there is nothing to drain"):
        ac.drain_prefetch(torch.nn.Linear(2, 2))


def _invalidate_one_case(rank, world):
    from ascend_compile.runtime import windows

    torch._dynamo.reset()
    shape = StackShape(layers=4)
    x = make_input(shape)
    ref_a, ref_b = build_stack(shape, seed=0)(x), build_stack(shape, seed=3)(x)
    a, b = build_stack(shape, seed=0), build_stack(shape, seed=3)
    sa = ac.shard_model(a, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    sb = ac.shard_model(b, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    fa = torch.compile(a, backend="ascend_compile", options={"lowering": "aot_eager"})
    fb = torch.compile(b, backend="ascend_compile", options={"lowering": "aot_eager"})
    equal = [torch.equal(fa(x), ref_a), torch.equal(fb(x), ref_b)]
    dropped = ac.invalidate_prefetch(a)  # a's weights changed: b's windows stay in flight
    kept = (windows.in_flight(sa.group_name), windows.in_flight(sb.group_name))
    equal += [torch.equal(fb(x), ref_b), torch.equal(fa(x), ref_a), torch.equal(fb(x), ref_b)]
    both = ac.invalidate_prefetch()  # the default group: every model sharded over it
    equal += [torch.equal(fa(x), ref_a), torch.equal(fb(x), ref_b)]
    ac.drain_prefetch()
    return {"groups": (sa.group_name, sb.group_name), "equal": equal, "dropped": dropped, "kept": kept, "both": both}


def test_invalidating_one_model_keeps_the_other_models_windows():
    for rank, r in enumerate(run_fresh(_invalidate_one_case, 2)):  # no other test's sharding over the default group
        assert r["groups"][0] != r["groups"][1], r  # each sharding broadcasts over a group of its own
        assert r["equal"] == [True] * 7, (rank, r)
        assert r["dropped"] == ["o_proj.weight[0]"] and r["kept"] == ([], ["o_proj.weight[0]"]), (rank, r)
        assert r["both"] == ["o_proj.weight[0]", "o_proj.weight[0]"], (rank, r)


def _reinit_case(rank, world, port):
    import torch.distributed as dist

    from ascend_compile.launch import init_gloo
    from ascend_compile.runtime import windows

    torch._dynamo.reset()
    shape = StackShape(layers=4)
    x = make_input(shape)
    ref = build_stack(shape)(x)
    first = build_stack(shape)
    s1 = ac.shard_model(first, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    torch.compile(first, backend="ascend_compile", options={"lowering": "aot_eager"})(x)
    left = windows.in_flight(s1.group_name)  # the next forward's window, never waited for
    dist.destroy_process_group()  # every group goes; c10d will hand the same names out again
    init_gloo(rank, world, port)
    torch._dynamo.reset()
    second = build_stack(shape)
    s2 = ac.shard_model(second, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    fresh = windows.in_flight(s2.group_name)
    fn = torch.compile(second, backend="ascend_compile", options={"lowering": "aot_eager"})
    equal = [torch.equal(fn(x), ref) for _ in range(3)]
    ac.drain_prefetch(second)
    return {"names": (s1.group_name, s2.group_name), "left": left, "fresh": fresh, "equal": equal}


def test_a_new_group_under_a_reused_name_starts_clean():
    from ascend_compile.launch import free_port

    for rank, r in enumerate(run_fresh(_reinit_case, 2, free_port(), timeout=240)):
        assert r["names"][0] == r["names"][1], r  # the situation under test: c10d reused the name
        assert r["left"] == ["o_proj.weight[0]"] and r["fresh"] == [], (rank, r)
        assert r["equal"] == [True] * 3, (rank, r)
