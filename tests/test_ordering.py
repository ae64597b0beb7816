"""The pinned collective order reaches Inductor's scheduler on every supported torch (2.10-2.15).

torch 2.10's ``preserve_node_ordering`` passes only top-level node arguments to the wrapped op
(a first reader that takes the fetched weight inside a list, ``aten.cat([w, x])``, failed with
``KeyError: cat_default``); the ``control_deps`` lowering of 2.10 and 2.11 drops, silently,
dependencies that lower to a list (multi-output ops such as ``sort``) and edges on ops that
create no kernel of their own. These tests compile such graphs and count the edges
that reached the scheduler.
"""

import json
import os

import pytest
import torch
from torch import nn

import ascend_compile as ac
from ascend_compile.passes import rewrite_shared_weights, schedule_prefetch
from ascend_compile.passes.pin_order import can_be_waited_for, can_wait, ordering_edges
from ranks import run_ranks

D = 16


class CatReader(nn.Module):
    """The fetched weight's first reader takes it inside a list."""

    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(D, D, bias=False)
        self.extra = nn.Parameter(torch.randn(D, D))

    def forward(self, h):
        w = torch.cat([self.o_proj.weight, self.extra * 2], 0)
        return torch.tanh(h @ w.t())[:, :D]


class SortNeighbour(nn.Module):
    """A multi-output op right before the next layer's wait."""

    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, h):
        return torch.sort(torch.tanh(self.o_proj(h)), dim=-1)[0]


KINDS = {"cat": CatReader, "sort": SortNeighbour}


def _model(kind):
    torch.manual_seed(0)
    return nn.Sequential(*[KINDS[kind]() for _ in range(4)])


def _graph(kind, k):
    """The aten graph our passes see, scheduled (no process group: markers traced by make_fx)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphs import GROUP, plan

    def f(x, *ws):
        h = x
        for i in range(4):
            fetched = torch.ops.ascend_compile.shared_weight(ws[2 * i], "o_proj.weight", i, i % 2, GROUP, k)
            if kind == "cat":
                h = torch.tanh(h @ torch.cat([fetched, ws[2 * i + 1] * 2], 0).t())[:, :D]
            else:
                h = torch.sort(torch.tanh(h @ fetched.t()), dim=-1)[0]
        return h

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, D), *[torch.randn(D, D) for _ in range(8)])
    return schedule_prefetch(rewrite_shared_weights(gm, plan()), plan())


@pytest.mark.parametrize("kind", ["cat", "sort"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_edges_have_ends_every_torch_can_carry(kind, k):
    gm = _graph(kind, k)
    edges = ordering_edges(gm.graph)
    assert edges, "nothing pinned"
    for after, befores in edges.items():
        assert can_wait(after), after.format_node()
        for before in befores:
            assert can_be_waited_for(before), before.format_node()
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.cat.default in targets or torch.ops.aten.sort.default in targets
    nested = [n for n in edges if n.target is torch.ops.aten.cat.default]
    assert not nested, "a node taking a list would break torch 2.10's preserve_node_ordering"
    multi = [b for bs in edges.values() for b in bs if b.target is torch.ops.aten.sort.default]
    assert not multi, "a multi-output dependency is dropped by the control_deps lowering"


def _inductor_case(rank, world, kind, k, dump):
    torch._dynamo.reset()
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    ref = torch.compile(_model(kind), backend="inductor")(x)
    model = _model(kind)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=k))
    out = torch.compile(model, backend="ascend_compile", options={"lowering": "inductor", "dump_dir": dump})(x)
    with open(os.path.join(dump, f"rank_{rank}", "schedule.json")) as f:
        table = json.load(f)
    fetched = [c for c in table["collectives"] if c["kind"] != "next"]  # the next forward's windows aside
    return {"bitwise": torch.equal(out, ref), "edges": table["ordering_edges"], "n": len(fetched)}


@pytest.mark.parametrize("kind", ["cat", "sort"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_every_ordering_edge_reaches_inductors_scheduler(kind, k, tmp_path):
    for r in run_ranks(_inductor_case, 2, kind, k, str(tmp_path)):
        assert r["bitwise"]
        assert r["n"] == 4
        edges = r["edges"]
        # at least: every wait after its neighbour, and the chain of the 4 broadcasts
        assert edges["requested"] >= 4 + 3
        assert edges["dropped"] == [] and edges["reached_scheduler"] == edges["requested"]


class _Pipeline:
    """The two attributes OrderingAudit uses, for edges a test chooses by hand."""

    def __init__(self):
        self.ordering_edges, self.ordering_report = None, None

    def uuid(self):
        return "test"


def test_the_edge_count_sees_what_inductor_drops():
    """The counter itself can fail: of two edges requested through torch's own
    ``preserve_node_ordering``, the one on a multi-output dependency is reported as dropped."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
    from torch.utils._ordered_set import OrderedSet

    from ascend_compile.lowering.inductor import OrderingAudit

    pipeline = _Pipeline()

    class AddEdges(CustomGraphPass):
        def __call__(self, graph):
            nodes = {n.target: n for n in graph.nodes if n.op == "call_function"}
            sort, tanh, mm = (nodes[torch.ops.aten.sort.default], nodes[torch.ops.aten.tanh.default],
                              nodes[torch.ops.aten.mm.default])
            relu = nodes[torch.ops.aten.relu.default]
            deps = {tanh: OrderedSet([relu]), mm: OrderedSet([sort])}  # pointwise "after"; list "before"
            pipeline.ordering_edges = [(relu.name, tanh.name), (sort.name, mm.name)]
            preserve_node_ordering(graph, deps)

        def uuid(self):
            return "add-edges"

    def f(a, b):
        r = torch.relu(b)
        s = torch.sort(a, dim=-1)[0]
        return torch.tanh(a * 2) + s, (r @ b) * 3

    torch._dynamo.reset()
    with config.patch(post_grad_custom_post_pass=AddEdges(), _pre_fusion_custom_pass=OrderingAudit(pipeline),
                      fx_graph_cache=False):
        torch.compile(f, backend="inductor")(torch.randn(8, 8), torch.randn(8, 8))
    report = pipeline.ordering_report
    # torch 2.10-2.12 skip a dependency that lowers to a list (sort's two outputs); from 2.13,
    # control_deps' lowering flattens it and the edge holds (run on 2.15.0; 2.13.0's lowering reads the same)
    drops_lists = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)
    assert report["requested"] == 2 and report["reached_scheduler"] == (1 if drops_lists else 2), report
    assert report["dropped"] == ([["sort", "mm"]] if drops_lists else []), report
