"""State the scheduled order of our collectives in the graph, so a lowering cannot undo it.

Inductor reorders freely (``reorder_for_peak_memory``, fusion, ...). For every broadcast and
wait we add ordering-only edges with ``control_deps`` (``preserve_node_ordering``):

- it runs after the nearest earlier node that does real work (so a wait cannot move earlier
  and block, and a broadcast cannot be issued before its anchor);
- the nearest later node that does real work runs after a broadcast (so it cannot sink
  towards its wait and lose the overlap);
- every broadcast runs after the previous one: one total order of collectives, the same
  on every rank.
"""

from __future__ import annotations

from typing import Optional

from torch import fx
from torch.utils._ordered_set import OrderedSet

from .graph import BUFFER, ISSUE, VIEW_TARGETS, WAIT, inner_target, is_ours, role
from .plan import CompilePlan


def _does_work(n: fx.Node) -> bool:
    return (n.op == "call_function" and inner_target(n) not in VIEW_TARGETS
            and n.target.__name__ != "getitem" and role(n) != BUFFER)


def _neighbour(node: fx.Node, forward: bool, include_ours: bool) -> Optional[fx.Node]:
    n = node.next if forward else node.prev
    while n.op != "root":
        if _does_work(n) and (include_ours or not is_ours(n)):
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
        if role(n) not in (ISSUE, WAIT):
            continue
        add(n, _neighbour(n, forward=False, include_ours=True))
        if role(n) == ISSUE:
            add(n, last_issue)
            last_issue = n
            nxt = _neighbour(n, forward=True, include_ours=False)
            if nxt is not None:
                add(nxt, n)
    return deps


def pin_collective_order(gm: fx.GraphModule, plan: CompilePlan) -> fx.GraphModule:
    if not plan.pin_order:
        return gm
    from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering

    deps = ordering_edges(gm.graph)
    preserve_node_ordering(gm.graph, deps)
    gm.graph.lint()
    gm.recompile()
    return gm
