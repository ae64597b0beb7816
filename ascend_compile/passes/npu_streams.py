"""Put the broadcasts on their own NPU stream and order them with events (torchair lowering).

GE does not order collectives for us and overlaps nothing on one stream. After scheduling:

- every broadcast runs inside a stream scope of its own label
  (``air.scope_enter(["_user_stream_label", "_user_stream_priority"], [label, priority])`` ...
  ``air.scope_exit()``), all on one side stream, so the link serves them in issue order,
  one total order identical on every rank;
- before a broadcast the side stream waits for an event recorded on the compute stream right
  after the broadcast's anchor (the wait of layer ``i - k``), so it is not issued earlier;
- after a broadcast the side stream records an event, and the compute stream waits for it
  right before the layer's ``wait_tensor``: the weight is there before its first use.

All inserted nodes are tagged ``role="stream"`` so the verifier sees them as ours. The ops
are torchair's ``torch.ops.air`` (``scope_enter``, ``scope_exit``, ``record``, ``wait``),
looked up when the pass runs: the pass itself imports nothing from torchair.
"""

from __future__ import annotations

from torch import fx

from .graph import ISSUE, NEXT, TAG, WAIT, collective_pairs, entry_point, positions, role, tag
from .plan import CompilePlan

STREAM = "stream"
STREAM_LABEL = "ascend_compile_bcast"
STREAM_PRIORITY = "0"


def _air():
    import torch

    try:
        return torch.ops.air
    except AttributeError:  # pragma: no cover - torchair registers the namespace
        raise RuntimeError("torch.ops.air is not registered: import torchair before compiling") from None


def _tag(node: fx.Node, like: fx.Node, what: str) -> fx.Node:
    t = tag(like)
    node.meta[TAG] = {"role": STREAM, "what": what, "series": t["series"], "index": t["index"], "owner": t["owner"],
                      "bytes": t["bytes"], "prefetch_step": t["prefetch_step"]}
    return node


def _anchor(issue: fx.Node) -> fx.Node:
    """The node after which the broadcast may start: the nearest earlier node not inserted by us."""
    n = issue.prev
    while n.op != "root" and tag(n) is not None and role(n) != WAIT:
        n = n.prev
    return n


def assign_broadcast_stream(gm: fx.GraphModule, plan: CompilePlan) -> fx.GraphModule:
    graph = gm.graph
    if any(role(n) == NEXT for n in graph.nodes):
        raise ValueError("npu_streams: the graph prefetches across steps (window ops); torchair cannot lower them")
    air = _air()
    head = entry_point(graph)
    pos = positions(graph)
    for pair in sorted(collective_pairs(graph).values(), key=lambda p: pos[p[ISSUE]]):
        issue, wait = pair[ISSUE], pair[WAIT]
        anchor = _anchor(issue)
        waits_for = []
        if anchor is not head and anchor.op != "placeholder":
            with graph.inserting_after(anchor):
                ready = _tag(graph.call_function(air.record.default, ()), issue, "record compute")
            waits_for = [ready]
        with graph.inserting_before(issue):
            _tag(graph.call_function(air.scope_enter.default,
                                     (["_user_stream_label", "_user_stream_priority"], [STREAM_LABEL, STREAM_PRIORITY])),
                 issue, "scope_enter")
            if waits_for:
                _tag(graph.call_function(air.wait.default, (waits_for,)), issue, "wait compute")
        with graph.inserting_after(issue):
            done = _tag(graph.call_function(air.record.default, ()), issue, "record broadcast")
        with graph.inserting_after(done):
            _tag(graph.call_function(air.scope_exit.default, ()), issue, "scope_exit")
        with graph.inserting_before(wait):
            _tag(graph.call_function(air.wait.default, ([done],)), issue, "wait broadcast")
    graph.lint()
    gm.recompile()
    return gm
