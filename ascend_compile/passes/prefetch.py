"""Place each broadcast ``k`` layers ahead of its use and each wait right before its use.

For a series whose layers are ``0..N-1`` in order of first use and prefetch step ``k``:

- the wait of layer ``i`` sits right before its first use;
- the broadcast of layer ``i`` is issued right after the wait of layer ``i - k``
  (layers ``0..k-1`` at graph entry; ``k = 0`` means right before its own wait);
- so at most ``k + 1`` windows of a series are alive at once.

With wrap-around (``plan.wrap``, ``w`` windows for a series the graph holds whole), layers
``0..w-1`` come from windows: their ``window_fetch`` sits at graph entry (it broadcasts only when
no window is in flight: the first forward) and their wait right before the first use, whatever
``k``; the ``window_prefetch`` of layer ``j`` (the next forward's copy) is issued right after the
wait of layer ``N - w + j`` (after any broadcast anchored there), or after the wait of the last
layer the graph broadcasts if that comes later (no broadcast ever follows a ``window_prefetch``:
see ``place_next_windows``), so the next forward's first ``w`` layers travel during this one's
last layers. Windows alive then: at most ``max(k, w) + 1`` during a forward, ``w`` between forwards.

The result is a pure function of the graph and the plan, hence the same collective order
on every rank. ``collective_schedule`` reads that order back for dumps and the rank check.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Optional

from torch import fx

from .graph import (
    BUFFER, ISSUE, NEXT, WAIT, collective_pairs, entry_point, first_user, is_ours, positions, role, tag, value_users,
)
from ..runtime.marker import layer_name
from .plan import CompilePlan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledLayer:
    series: str
    index: int
    issue: fx.Node
    wait: fx.Node
    first_use: fx.Node
    step: int
    window: bool = False  # fetched from a window filled by the previous forward (wrap-around)
    next: Optional[fx.Node] = None  # the broadcast of this layer for the next forward


def find_series_layers(graph: fx.Graph, plan: CompilePlan) -> dict:
    """``{series: [ScheduledLayer]}``, each list in order of first use."""
    pos = positions(graph)
    series: dict = {}
    for (name, index), pair in collective_pairs(graph).items():
        if ISSUE not in pair or WAIT not in pair:
            raise ValueError(f"{name}[{index}] has a {'wait' if WAIT in pair else 'broadcast'} but no partner")
        use = first_user(pair[WAIT], pos)
        if use is None:
            raise ValueError(f"{name}[{index}]: the fetched weight is never used ({pair[WAIT].name})")
        t = tag(pair[ISSUE])
        series.setdefault(name, []).append(ScheduledLayer(name, index, pair[ISSUE], pair[WAIT], use,
                                                          t["prefetch_step"], bool(t.get("window")), pair.get(NEXT)))
    for layers in series.values():
        layers.sort(key=lambda layer: pos[layer.first_use])
        steps = {layer.step for layer in layers}
        if len(steps) != 1:
            raise ValueError(f"series {layers[0].series!r} mixes prefetch steps {sorted(steps)}")
    return series


def _latest_input(node: fx.Node, pos: dict) -> Optional[fx.Node]:
    inputs = [a for a in node.all_input_nodes if role(a) != BUFFER]
    return max(inputs, key=pos.__getitem__) if inputs else None


def _with_buffer(issue: fx.Node) -> list:
    """The issue and the receive buffer made for it: they move together."""
    return [a for a in issue.all_input_nodes if role(a) == BUFFER] + [issue]


def _place_after(anchor: fx.Node, issue: fx.Node) -> fx.Node:
    for n in _with_buffer(issue):
        anchor.append(n)
        anchor = n
    return anchor


def _place_before(node: fx.Node, issue: fx.Node) -> None:
    for n in _with_buffer(issue):
        node.prepend(n)


def schedule_prefetch(gm: fx.GraphModule, plan: CompilePlan) -> fx.GraphModule:
    """Move broadcasts and waits to their scheduled places (see module docstring)."""
    graph = gm.graph
    series = find_series_layers(graph, plan)
    if not series:
        log.debug("schedule_prefetch: no shared-weight collectives in graph")
        return gm

    # Weights read by get_attr (graphs traced by make_fx) join the graph's head: a get_attr has no
    # inputs, and a broadcast moved up must not come before the weight it sends.
    head = entry_point(graph)
    for layers in series.values():
        for layer in layers:
            for a in layer.issue.all_input_nodes:
                if a.op == "get_attr" and a is not head:
                    head.append(a)
                    head = a

    # Waits first: each right before its first use.
    for layers in series.values():
        for layer in layers:
            layer.first_use.prepend(layer.wait)

    # Broadcasts anchored at graph entry go there in order of first use (a stable, rank-independent order).
    pos = positions(graph)
    at_entry = sorted(
        (layer for layers in series.values() for j, layer in enumerate(layers) if j < layer.step or layer.window),
        key=lambda layer: (pos[layer.first_use], layer.series),
    )
    anchor = entry_point(graph)
    for layer in at_entry:
        src = _latest_input(layer.issue, pos)
        if src is not None and src.op not in ("placeholder", "get_attr"):
            raise ValueError(
                f"cannot prefetch {layer.series}[{layer.index}] at graph entry: its weight is computed by "
                f"{src.name!r} inside the graph"
            )
        anchor = _place_after(anchor, layer.issue)

    for layers in series.values():
        for j, layer in enumerate(layers):
            k = layer.step
            if layer.window:
                continue
            if k == 0:
                _place_before(layer.wait, layer.issue)
            elif j >= k:
                _place_after(layers[j - k].wait, layer.issue)

    place_next_windows(series)

    graph.lint()
    gm.recompile()
    return gm


def place_next_windows(series: dict) -> None:
    """The next forward's windows: window ``j`` of a series right after the wait of layer ``N - w + j``
    and after the graph's last broadcast, in order of those places, each after the one before.

    ``window_prefetch`` is an opaque op whose token nothing reads, so no ordering edge *from* it
    survives Inductor (its scheduler drops an unread buffer, and the edges with it). Its place
    among the collectives is therefore held by its inputs only: ``after`` (the anchor's wait),
    ``last`` (the graph's last broadcast, whose output it takes without reading it: Inductor keeps
    its own collectives in graph order, so every broadcast of the graph is issued before) and
    ``prev`` (the window before). So no broadcast can come after a ``window_prefetch``, on any rank.
    """
    fetched = [layer for layers in series.values() for layer in layers if not layer.window]
    if not any(layer.next is not None for layers in series.values() for layer in layers):
        return
    graph = next(iter(series.values()))[0].wait.graph
    pos = positions(graph)
    last = max((layer.issue for layer in fetched), key=pos.__getitem__, default=None)
    todo = []
    for layers in series.values():
        windows = [layer for layer in layers if layer.window]
        for j, layer in enumerate(windows):
            if layer.next is None or layers[j] is not layer:
                raise ValueError(f"{layer.series}[{layer.index}] is prefetched across steps but is not among the "
                                 "first layers of its series in this graph")
            todo.append((layers[len(layers) - len(windows) + j].wait, layer))
    todo.sort(key=lambda t: (pos[t[0]], t[1].series, t[1].index))
    prev = None
    for anchor, layer in todo:
        floor = last if last is not None and pos[last] > pos[anchor] else anchor
        if prev is not None and pos[prev] > pos[floor]:
            floor = prev
        layer.next.update_arg(1, anchor)
        layer.next.update_arg(2, last if last is not None else anchor)
        layer.next.update_arg(3, prev)
        after = floor
        while after.next.op != "root" and is_ours(after.next) and role(after.next) in (ISSUE, BUFFER, NEXT):
            after = after.next
        after.append(layer.next)
        pos = positions(graph)
        prev = layer.next


def collective_schedule(graph: fx.Graph) -> list:
    """The collectives of a scheduled graph in issue order, with node positions.

    ``[{"series", "index", "owner", "bytes", "prefetch_step", "issue", "wait", "first_use", "last_use",
    "kind"}]``; positions are node indices in ``graph``. ``kind`` is ``"fetch"`` (broadcast in this
    graph), ``"window"`` (waited from a window: broadcast here only on the first forward) or
    ``"next"`` (the broadcast of a window for the next forward, never waited in this graph).
    """
    pos = positions(graph)
    rows = []
    for (name, index), pair in collective_pairs(graph).items():
        t = tag(pair[ISSUE])
        wait = pair.get(WAIT)
        users = value_users(wait) if wait is not None else []
        rows.append({
            "series": name, "index": index, "owner": t["owner"], "bytes": t["bytes"],
            "prefetch_step": t["prefetch_step"], "issue": pos[pair[ISSUE]],
            "wait": pos[wait] if wait is not None else None,
            "first_use": min((pos[u] for u in users), default=None),
            "last_use": max((pos[u] for u in users), default=None),
            "kind": "window" if t.get("window") else "fetch",
        })
        if NEXT in pair:
            rows.append({
                "series": name, "index": index, "owner": t["owner"], "bytes": t["bytes"],
                "prefetch_step": t["prefetch_step"], "issue": pos[pair[NEXT]], "wait": None,
                "first_use": None, "last_use": None, "kind": "next",
            })
    rows.sort(key=lambda r: r["issue"])
    return rows


@dataclasses.dataclass(frozen=True)
class Collective:
    """One broadcast of a graph's collective order. ``kind``: ``"fetch"`` (this forward's),
    ``"window"`` (a layer that came from the previous forward: broadcast here only when no window
    is in flight) or ``"next"`` (sent for the next forward). ``str()`` is how dumps, ``explain``,
    errors and the runtime check (through the store) show it."""

    series: str
    index: int
    owner: int
    bytes: int
    kind: str = "fetch"

    MARKS: ClassVar[dict] = {"fetch": "", "window": " (window)", "next": " (next step)"}

    @property
    def layer(self) -> str:
        return layer_name(self.series, self.index)

    def __str__(self) -> str:
        return f"{self.layer} owner={self.owner} bytes={self.bytes}{self.MARKS[self.kind]}"


def collective_order(schedule: list) -> list:
    """What must be identical on every rank, for every graph over the same layers: the broadcasts
    of ``collective_schedule`` rows (or a ``schedule.json``'s ``collectives``) as ``Collective``
    values, in issue order. The step is not part of it: ranks may fetch further ahead or not, as
    long as they issue the same broadcasts in the same order."""
    return [Collective(r["series"], r["index"], r["owner"], r["bytes"], r.get("kind", "fetch"))
            for r in sorted(schedule, key=lambda r: r["issue"])]


def order_layers(order: list) -> list:
    """The layers an order fetches, sorted: with the sharding and its wrap-around setting, what
    names the graphs whose orders must be equal (``order.order_key``)."""
    return sorted({c.layer for c in order})
