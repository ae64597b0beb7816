"""State the scheduled order of our collectives in the graph, so a lowering cannot undo it.

Inductor reorders freely (``reorder_for_peak_memory``, fusion, ...). For every broadcast and
wait we add ordering-only edges with ``control_deps`` (``preserve_node_ordering``):

- it runs after the nearest earlier node that does real work (so a wait cannot move earlier
  and block, and a broadcast cannot be issued before its anchor);
- the nearest later kernel that is not ours runs after a broadcast (so the broadcast cannot
  sink towards its wait and lose the overlap);
- every broadcast runs after the previous one: one total order of collectives, the same
  on every rank (Inductor also orders its own collectives as the graph lists them; the window
  ops of wrap-around are custom ops it does not know as collectives, so this chain is what
  keeps them in place among the broadcasts). The next forward's ``window_prefetch`` is the
  exception: nothing reads its token, so Inductor's scheduler drops the buffer and every edge
  from it; it is only ever the "after" end, and its inputs keep it after every other
  collective (``passes/prefetch.py``).

An edge only holds if Inductor's lowering of ``control_deps`` can carry it, on every torch we
support (2.10-2.15; CI runs 2.10.0 and 2.11.0, the ordering tests were run by hand on 2.15.0),
so the ends of an edge are chosen with that in mind:

- the node that must wait ("after") is one of our collectives or a node Inductor lowers to a
  kernel of its own (matmul-like extern kernels, custom ops): the lowering attaches the edge
  to the operations the wrapped node creates, and a view, or a pointwise op Inductor inlines
  into its reader, creates none (the edge would be dropped without a word);
- its tensor inputs are top-level arguments: torch 2.10's ``preserve_node_ordering`` passes
  only those to the wrapped op (``aten.cat([w, x])`` fails there with ``KeyError``);
- the node waited for ("before") returns one tensor: up to torch 2.12 the lowering skips
  dependencies that lower to a list (``split`` and other multi-output ops; from 2.13 it
  flattens them);
- both return a tensor: the lowering asserts the wrapped op has an output.

``ordering_edges`` records the edges it asked for in ``gm.meta[EDGES_META]`` (node names), so
a lowering can check which of them reached its scheduler (``lowering/inductor.py``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import fx
from torch.utils._ordered_set import OrderedSet

from .graph import BUFFER, ISSUE, NEXT, WAIT, inner_target, is_ours, is_view, role
from .plan import CompilePlan

EDGES_META = "ascend_compile_ordering_edges"

_aten = torch.ops.aten
# aten ops Inductor always lowers to an extern kernel of their own (never fused away)
KERNEL_PACKETS = {
    _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten._int_mm, _aten._scaled_mm,
    _aten._weight_int8pack_mm, _aten.convolution,
}


def _does_work(n: fx.Node) -> bool:
    return (n.op == "call_function" and not is_view(n) and n.target.__name__ != "getitem"
            and role(n) != BUFFER)


def _one_tensor(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


def _top_level_inputs(n: fx.Node) -> bool:
    top = {a for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node)}
    return set(n.all_input_nodes) <= top


def can_wait(n: fx.Node) -> bool:
    """``n`` can be made to run after another node, on every supported torch."""
    if not (_does_work(n) and _one_tensor(n) and _top_level_inputs(n)):
        return False
    if is_ours(n):
        return True
    target = inner_target(n)
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return target.namespace not in ("aten", "prims") or target.overloadpacket in KERNEL_PACKETS


def can_be_waited_for(n: fx.Node) -> bool:
    """Another node can be made to run after ``n``, on every supported torch (not after a token
    nothing reads: Inductor drops the buffer, and the edge with it)."""
    return _does_work(n) and _one_tensor(n) and role(n) != NEXT


def _nearest(node: fx.Node, forward: bool, ok: Callable[[fx.Node], bool]) -> Optional[fx.Node]:
    n = node.next if forward else node.prev
    while n.op != "root":
        if ok(n):
            return n
        n = n.next if forward else n.prev
    return None


def ordering_edges(graph: fx.Graph) -> dict:
    """``{node: OrderedSet(nodes that must run before it)}`` pinning the current order."""
    deps: dict = {}

    def add(after: fx.Node, before: Optional[fx.Node]) -> None:
        if before is not None and before is not after and before not in after.all_input_nodes:
            deps.setdefault(after, OrderedSet()).add(before)

    last_issue = None
    for n in list(graph.nodes):
        if role(n) not in (ISSUE, WAIT, NEXT):
            continue
        add(n, _nearest(n, forward=False, ok=can_be_waited_for))
        if role(n) == NEXT:  # nothing reads its token: an edge from it would not survive (its inputs order it)
            add(n, last_issue)
            continue
        if role(n) == ISSUE:
            add(n, last_issue)
            last_issue = n
            nxt = _nearest(n, forward=True, ok=lambda m: can_wait(m) and not is_ours(m))
            if nxt is not None:
                add(nxt, n)
    return deps


def pin_collective_order(gm: fx.GraphModule, plan: CompilePlan) -> fx.GraphModule:
    if not plan.pin_order:
        return gm
    from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering

    deps = ordering_edges(gm.graph)
    requested = [(before.name, after.name) for after, befores in deps.items() for before in befores]
    preserve_node_ordering(gm.graph, deps)  # keeps node names: the recorded edges still name them
    gm.meta[EDGES_META] = requested
    gm.graph.lint()
    gm.recompile()
    return gm
