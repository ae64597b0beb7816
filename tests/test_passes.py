"""Each pass alone, on small aten graphs: op counts, order, invariants, and the verifier's errors."""

import re

import pytest
import torch

from ascend_compile.passes import (
    PassPipeline, ScheduleError, collective_schedule, default_passes, pin_collective_order,
    rewrite_shared_weights, schedule_prefetch, verify_schedule,
)
from ascend_compile.passes.graph import BROADCAST_TARGETS, WAIT_TARGETS, collective_pairs, is_marker
from ascend_compile.passes.pin_order import ordering_edges
from ascend_compile.runtime.ops import shared_weight_targets
from graphs import GROUP, count, plan, stack_graph

C10D = torch.ops._c10d_functional


def scheduled(n, series, k, world=2, inplace=False):
    p = plan(inplace=inplace)
    gm = stack_graph(n, series, k, world)
    return schedule_prefetch(rewrite_shared_weights(gm, p), p)


def test_rewrite_makes_one_broadcast_and_one_wait_per_layer():
    gm = stack_graph(5, ("o_proj", "q_b_proj"), k=1)
    assert count(gm, *shared_weight_targets()) == 10
    gm = rewrite_shared_weights(gm, plan())
    assert count(gm, *shared_weight_targets()) == 0
    assert count(gm, *BROADCAST_TARGETS) == 10
    assert count(gm, *WAIT_TARGETS) == 10
    for node in gm.graph.nodes:
        if node.target is C10D.broadcast.default:
            meta = node.meta["ascend_compile"]
            assert node.args[1] == meta["index"] % 2 == meta["owner"]  # src is the owner's group rank
            assert node.args[2] == GROUP
            assert meta["bytes"] == 8 * 8 * 4
            (wait,) = node.users
            assert wait.target is C10D.wait_tensor.default


def test_inplace_rewrite_copies_no_layer():
    gm = rewrite_shared_weights(stack_graph(4, ("o_proj",), k=1), plan(rank=1, inplace=True))
    assert count(gm, *BROADCAST_TARGETS) == 4 and count(gm, C10D.broadcast.default) == 0
    empties = [n for n in gm.graph.nodes if n.target is torch.ops.aten.empty.memory_format]
    assert len(empties) == 2  # rank 1 receives layers 0 and 2 into fresh buffers
    for node in gm.graph.nodes:
        if node.target is C10D.broadcast_.default:
            src = node.args[0]
            owner = node.meta["ascend_compile"]["owner"]
            # the owner sends its own parameter; nobody reads a stand-in
            assert (src.op == "placeholder") == (owner == 1)
            assert src.op == "placeholder" or src in empties


def test_rewrite_fetches_a_parameter_read_twice_once():
    gm = rewrite_shared_weights(stack_graph(3, k=1, reuse_first_at_end=True), plan())
    assert count(gm, *BROADCAST_TARGETS) == 3 and count(gm, *WAIT_TARGETS) == 3


def test_rewrite_refuses_a_marker_of_another_group():
    gm = stack_graph(2)
    with pytest.raises(ValueError, match="shared over group 'test_group' but this compile plan is for group 'other'"):
        rewrite_shared_weights(gm, plan().__class__(0, 2, "other"))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2, 5])
@pytest.mark.parametrize("series", [("o_proj",), ("o_proj", "q_b_proj")])
def test_schedule_places_issue_after_wait_of_layer_i_minus_k(k, series, inplace):
    n = 6
    gm = scheduled(n, series, k, inplace=inplace)
    nodes = list(gm.graph.nodes)
    rows = collective_schedule(gm.graph)
    assert len(rows) == n * len(series)
    first_compute = next(i for i, node in enumerate(nodes) if node.op == "call_function" and "ascend_compile" not in node.meta)
    for name in {r["series"] for r in rows}:
        layers = sorted((r for r in rows if r["series"] == name), key=lambda r: r["first_use"])
        assert [r["index"] for r in layers] == list(range(n))
        for j, r in enumerate(layers):
            assert r["wait"] < r["first_use"]
            between = nodes[r["wait"] + 1:r["first_use"]]
            assert all("ascend_compile" in b.meta for b in between), f"compute between wait and use of {name}[{j}]"
            if k == 0:
                assert r["issue"] < r["wait"] and all("ascend_compile" in b.meta for b in nodes[r["issue"] + 1:r["wait"]])
            elif j < k:
                assert r["issue"] < first_compute
            else:
                prev_wait = layers[j - k]["wait"]
                assert prev_wait < r["issue"]
                assert all("ascend_compile" in b.meta for b in nodes[prev_wait + 1:r["issue"]])
    verify_schedule(gm, plan())


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_at_most_k_plus_one_buffers_alive(k):
    from ascend_compile.debug.dump import buffers_alive

    rows = collective_schedule(scheduled(6, ("o_proj",), k).graph)
    peak = max(n for _, n in buffers_alive(rows)["o_proj.weight"])
    assert peak == min(k, 5) + 1


def test_issue_order_is_the_same_for_every_rank():
    orders = []
    for rank in range(3):
        p = plan(rank=rank, world=3)
        gm = schedule_prefetch(rewrite_shared_weights(stack_graph(5, ("o_proj", "q_b_proj"), 2, world=3), p), p)
        orders.append([(r["series"], r["index"]) for r in collective_schedule(gm.graph)])
    assert orders[0] == orders[1] == orders[2]


def _move_before(node, anchor):
    anchor.prepend(node)


def _pairs(gm):
    return {f"{s}[{i}]": p for (s, i), p in collective_pairs(gm.graph).items()}


def test_verify_rejects_a_marker_left_in_the_graph():
    with pytest.raises(ScheduleError, match="shared_weight marker left in the final graph"):
        verify_schedule(stack_graph(2), plan())


def test_verify_rejects_a_wait_that_blocks_early():
    gm = scheduled(4, ("o_proj",), 1)
    pair = _pairs(gm)["o_proj.weight[2]"]
    pair["issue"].append(pair["wait"])  # wait right after its issue: blocks during layer 1's compute
    with pytest.raises(ScheduleError, match=r"wait of o_proj.weight\[2\].*is not right before its first use"):
        verify_schedule(gm, plan())


def test_verify_rejects_an_issue_that_is_late():
    gm = scheduled(4, ("o_proj",), 1)
    pair = _pairs(gm)["o_proj.weight[2]"]
    pair["wait"].prepend(pair["issue"])  # issued at use, not one layer ahead
    with pytest.raises(ScheduleError, match=r"issue of o_proj.weight\[2\].*is not issued right after the wait of o_proj.weight\[1\]"):
        verify_schedule(gm, plan())


def test_verify_rejects_a_prefetch_that_is_not_at_entry():
    gm = scheduled(4, ("o_proj",), 2)
    pairs = _pairs(gm)
    pairs["o_proj.weight[1]"]["wait"].prepend(pairs["o_proj.weight[1]"]["issue"])  # after layer 0 computed
    with pytest.raises(ScheduleError, match=r"o_proj.weight\[1\].*at graph entry"):
        verify_schedule(gm, plan())


def test_verify_rejects_too_many_buffers_alive():
    # layer 0's weight is read again at the end: its window stays alive across the stack
    p = plan()
    gm = schedule_prefetch(rewrite_shared_weights(stack_graph(4, ("o_proj",), 1, reuse_first_at_end=True), p), p)
    with pytest.raises(ScheduleError, match=r"3 layer buffers of series 'o_proj.weight' are alive .* prefetch_step=1 allows 2"):
        verify_schedule(gm, p)


def test_verify_rejects_a_wait_without_its_broadcast():
    gm = scheduled(3, ("o_proj",), 1)
    pair = _pairs(gm)["o_proj.weight[1]"]
    other = _pairs(gm)["o_proj.weight[2]"]["issue"]
    pair["wait"].replace_input_with(pair["issue"], other)
    with pytest.raises(ScheduleError, match=r"wait of o_proj.weight\[1\].* does not wait on the broadcast of o_proj.weight\[1\]"):
        verify_schedule(gm, plan())


def test_pin_order_chains_every_issue_and_keeps_invariants():
    from torch._inductor.fx_passes.control_dependencies import control_deps

    gm = scheduled(4, ("o_proj", "q_b_proj"), 1)
    edges = ordering_edges(gm.graph)
    issues = [n for n in gm.graph.nodes if n.meta.get("ascend_compile", {}).get("role") == "issue"]
    for prev, cur in zip(issues, issues[1:]):
        assert prev in edges[cur], f"{cur.name} is not ordered after {prev.name}"
    before = [(r["series"], r["index"]) for r in collective_schedule(gm.graph)]
    gm = pin_collective_order(gm, plan(pin=True))
    assert sum(1 for n in gm.graph.nodes if n.target is control_deps) >= len(issues)
    assert [(r["series"], r["index"]) for r in collective_schedule(gm.graph)] == before
    verify_schedule(gm, plan())
    assert not any(is_marker(n) for n in gm.graph.nodes)


def test_pipeline_runs_passes_in_order_and_reports_each_graph():
    seen = []
    pipe = PassPipeline(plan(pin=True), default_passes(pin=True),
                        observer=lambda i, name, phase, gm: seen.append((i, name, phase)))
    pipe(stack_graph(3, ("o_proj",), 1))
    assert seen == [(1, "shared_weight", "before"), (1, "shared_weight", "after"), (2, "prefetch", "before"),
                    (2, "prefetch", "after"), (3, "pin_order", "before"), (3, "pin_order", "after"),
                    (4, "verify", "before"), (4, "verify", "after")]
    assert len(pipe.final_schedule) == 3


def _record_observers(monkeypatch) -> list:
    """Replace Inductor's GraphTransformObserver with one that records, per pass it observes, its
    name and the shared-weight markers and control_deps in the graph on entry and at exit."""
    from torch.fx.passes import graph_transform_observer as gto
    from torch.ops import higher_order

    seen = []

    def counts(gm):
        return (sum(1 for n in gm.graph.nodes if is_marker(n)),
                sum(1 for n in gm.graph.nodes if n.target is higher_order.control_deps))

    class Recording(gto.GraphTransformObserver):
        def __enter__(self):
            seen.append([self.passname, self.gm, counts(self.gm)])
            return super().__enter__()

        def __exit__(self, *exc):
            seen[-1].append(counts(self.gm))
            return super().__exit__(*exc)

    monkeypatch.setattr(gto, "GraphTransformObserver", Recording)
    return seen


def test_each_pass_runs_inside_inductors_graph_transform_observer(monkeypatch):
    seen = _record_observers(monkeypatch)
    gm = stack_graph(3, ("o_proj",), 1)
    PassPipeline(plan(pin=True), default_passes(pin=True))(gm)
    assert [s[0] for s in seen] == ["ascend_compile_shared_weight", "ascend_compile_prefetch",
                                    "ascend_compile_pin_order", "ascend_compile_verify"]
    assert all(s[1] is gm for s in seen)  # the observer draws the graph the pass rewrote
    (_, _, before_rewrite, after_rewrite), _, (_, _, before_pin, after_pin), _ = seen
    assert before_rewrite == (3, 0) and after_rewrite == (0, 0)
    assert before_pin[1] == 0 and after_pin[1] >= 3


def test_log_url_for_graph_xform_draws_our_passes(tmp_path):
    pytest.importorskip("pydot")
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"trace.log_url_for_graph_xform": str(tmp_path)}):
        PassPipeline(plan(pin=True), default_passes(pin=True))(stack_graph(3, ("o_proj",), 1))
    files = {re.sub(r"^pass_\d+_", "", f.name) for f in tmp_path.iterdir()}
    # passes that create or erase nodes are drawn; prefetch only moves nodes, verify only reads
    assert files == {f"ascend_compile_{name}_{end}_graph.dot"
                     for name in ("shared_weight", "pin_order") for end in ("input", "output")}


def test_log_url_for_graph_xform_without_pydot_warns_and_runs_the_passes(tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config
    from torch.fx.passes import graph_drawer

    monkeypatch.setattr(graph_drawer, "HAS_PYDOT", False)
    seen = _record_observers(monkeypatch)
    pipe = PassPipeline(plan(pin=True), default_passes(pin=True))
    with inductor_config.patch({"trace.log_url_for_graph_xform": str(tmp_path)}):
        with pytest.warns(RuntimeWarning, match="pydot is not installed"):
            pipe(stack_graph(3, ("o_proj",), 1))
    assert seen == [] and list(tmp_path.iterdir()) == []
    assert len(pipe.final_schedule) == 3


def test_provenance_tracking_leaves_our_dumps_as_they_are(tmp_path):
    from torch._inductor import config as inductor_config

    from ascend_compile.debug.dump import GraphDumper

    def dump(root):
        dumper = GraphDumper(str(root), 0, "0_0")
        gm = stack_graph(3, ("o_proj",), 1)
        PassPipeline(plan(pin=True), default_passes(pin=True), observer=dumper.graph)(gm)
        return gm, {f.name: f.read_text() for f in (root / "rank_0" / "graph_0_0").iterdir()}

    _, plain = dump(tmp_path / "plain")
    with inductor_config.patch({"trace.provenance_tracking_level": 1}):  # the observer is active, draws nothing
        gm, tracked = dump(tmp_path / "tracked")
    assert len(plain) == 8 and tracked == plain
    created_by = {s.pass_name for n in gm.graph.nodes for s in n.meta.get("from_node", ())}
    assert {"ascend_compile_shared_weight", "ascend_compile_pin_order"} <= created_by


def test_a_pass_that_returns_another_graph_module_is_refused():
    import copy

    with pytest.raises(TypeError, match="pass 'copy' returned a new GraphModule"):
        PassPipeline(plan(), [("copy", lambda gm, p: copy.deepcopy(gm))])(stack_graph(2, ("o_proj",), 1))


def test_cache_key_covers_rank_world_step_and_group():
    passes = default_passes(pin=True)
    uuids = {
        PassPipeline(p, passes).uuid()
        for p in (plan(k=1, rank=0), plan(k=1, rank=1), plan(k=2, rank=0), plan(k=1, rank=0, world=3),
                  plan(k=1, rank=0).__class__(0, 2, "another_group", 1, False))
    }
    assert len(uuids) == 5
    assert PassPipeline(plan(k=1), passes).uuid() == PassPipeline(plan(k=1), passes).uuid()


def test_prefetch_step_option_out_of_range_names_the_series():
    from ascend_compile.passes.planning import make_plan
    from ascend_compile.config import CompileOptions, ConfigError

    gm = stack_graph(3, ("o_proj", "q_b_proj"), k=1)
    with pytest.raises(ConfigError, match=r"options\['prefetch_step'\]=3 is out of range for series 'o_proj.weight', "
                                          r"which has 3 layer\(s\) in this graph: use 0..2"):
        make_plan(gm, CompileOptions(prefetch_step=3))
