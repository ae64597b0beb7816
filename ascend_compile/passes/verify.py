"""Check the scheduling invariants on a final graph; raise naming the node and the layer.

Invariants, per series with prefetch step ``k`` (docs/how_it_works.md):

1. no ``shared_weight`` marker is left (a stand-in must never reach a matmul);
2. every broadcast has exactly one wait, after it, and every wait reads a broadcast;
3. the wait of a layer sits right before its first use (only our own collectives between);
4. the broadcast of layer ``i`` is issued right after the wait of layer ``i - k`` (layers
   ``< k``: before any computation; ``k = 0``: right before its own wait);
5. at most ``k + 1`` layer buffers of a series are alive at any point (``max(k, w) + 1`` with ``w``
   windows, the buffers prefetched across forwards, counted from their issue to the end of the graph);
6. wrap-around: a layer from a window is fetched at graph entry, and the broadcast of window ``j``
   for the next forward is issued right after the wait of layer ``N - w + j``.
"""

from __future__ import annotations

from torch import fx

from .graph import (
    ISSUE, NEXT, WAIT, collective_pairs, describe, is_broadcast, is_marker, is_next, is_ours, is_wait, layer_key,
    nodes_between, positions, tag, value_users,
)
from .plan import CompilePlan
from .prefetch import find_series_layers


class ScheduleError(AssertionError):
    """A graph breaks a scheduling invariant."""


def _only_ours_between(a: fx.Node, b: fx.Node) -> list:
    return [n for n in nodes_between(a, b) if not is_ours(n) and n.op not in ("get_attr",)]


def check_next_windows_last(graph: fx.Graph, pos: dict) -> None:
    """No broadcast after a ``window_prefetch``, and each one ordered by its inputs: after the
    graph's last broadcast (``last``) and after the one before (``prev``)."""
    nexts = [n for n in graph.nodes if is_next(n) and tag(n)]
    if not nexts:
        return
    fetches = [n for n in graph.nodes if tag(n) and tag(n)["role"] == ISSUE and not tag(n).get("window")]
    later = [f for f in fetches if pos[f] > pos[nexts[0]]]
    if later:
        raise ScheduleError(f"{describe(later[0])} is issued after {describe(nexts[0])}: nothing orders a broadcast "
                            "after a window for the next forward, so ranks could issue them in different orders")
    if fetches:
        last = max(fetches, key=pos.__getitem__)
        if not all(n.args[2] is last for n in nexts):
            raise ScheduleError(f"{describe(nexts[0])} is not ordered after the graph's last broadcast ({describe(last)})")
    for before, n in zip(nexts, nexts[1:]):
        if n.args[3] is not before:
            raise ScheduleError(f"{describe(n)} is not ordered after {describe(before)}")


def verify_schedule(gm: fx.GraphModule, plan: CompilePlan) -> fx.GraphModule:
    graph = gm.graph
    for n in graph.nodes:
        if is_marker(n):
            raise ScheduleError(f"{n.name}: shared_weight marker left in the final graph; the rewrite did not run")
        t = tag(n)
        if t and t["role"] == WAIT:
            sources = [s for s in n.all_input_nodes if is_broadcast(s) and tag(s) and tag(s)["role"] == ISSUE]
            if not is_wait(n) or not any(layer_key(s) == layer_key(n) for s in sources):
                raise ScheduleError(f"{describe(n)} does not wait on the broadcast of {t['series']}[{t['index']}]")
        if t and t["role"] == ISSUE and not is_broadcast(n):
            raise ScheduleError(f"{describe(n)} is tagged as a broadcast but runs {n.target}")
        if t and t["role"] == NEXT and not is_next(n):
            raise ScheduleError(f"{describe(n)} is tagged as the next forward's broadcast but runs {n.target}")

    pos = positions(graph)
    for key, pair in collective_pairs(graph).items():
        if ISSUE not in pair or WAIT not in pair:
            missing = WAIT if WAIT in pair else ISSUE
            raise ScheduleError(f"{key[0]}[{key[1]}] has no {missing} node")
        if pos[pair[WAIT]] < pos[pair[ISSUE]]:
            raise ScheduleError(f"{describe(pair[WAIT])} comes before its broadcast {pair[ISSUE].name!r}")
        if bool(tag(pair[ISSUE]).get("window")) != (NEXT in pair):
            raise ScheduleError(f"{key[0]}[{key[1]}]: a layer from a window needs the next forward's broadcast, "
                                "and only such a layer has one")

    check_next_windows_last(graph, pos)
    for name, layers in find_series_layers(graph, plan).items():
        k = layers[0].step
        windows = [layer for layer in layers if layer.window]
        w = len(windows)
        if windows != layers[:w]:
            raise ScheduleError(f"series {name!r}: the layers from windows {[a.index for a in windows]} are not its "
                                "first layers in this graph")
        for j, layer in enumerate(windows):
            anchor = layers[len(layers) - w + j].wait
            floor = max((anchor, layer.next.args[2]), key=pos.__getitem__)
            if not (layer.next.args[1] is anchor and pos[floor] < pos[layer.next]
                    and not _only_ours_between(floor, layer.next)):
                raise ScheduleError(f"{describe(layer.next)} is not issued right after the wait of "
                                    f"{name}[{layers[len(layers) - w + j].index}] ({anchor.name!r})")
        for j, layer in enumerate(layers):
            between = _only_ours_between(layer.wait, layer.first_use)
            if between:
                raise ScheduleError(
                    f"{describe(layer.wait)} is not right before its first use {layer.first_use.name!r}: "
                    f"{[n.name for n in between]} run in between, so the wait blocks too early"
                )
            if j < w or (0 < k and j < k):
                anchor_ok = all(n.op in ("placeholder", "get_attr") or is_ours(n) for n in graph.nodes
                                if pos[n] < pos[layer.issue])
                expected = "at graph entry, before any computation"
            elif k == 0:
                anchor_ok = not _only_ours_between(layer.issue, layer.wait)
                expected = f"right before its wait {layer.wait.name!r}"
            else:
                prev = layers[j - k].wait
                anchor_ok = pos[prev] < pos[layer.issue] and not _only_ours_between(prev, layer.issue)
                expected = f"right after the wait of {name}[{layers[j - k].index}] ({prev.name!r})"
            if not anchor_ok:
                raise ScheduleError(f"{describe(layer.issue)} is not issued {expected} (prefetch_step={k})")

        # Windows alive: from issue to the last read of the fetched value (through views).
        spans = []
        for layer in layers:
            last = max((pos[u] for u in value_users(layer.wait)), default=pos[layer.wait])
            spans.append((pos[layer.issue], last, layer))
        spans += [(pos[layer.next], len(pos), layer) for layer in windows]  # held into the next forward
        bound = max(k, w) + 1
        for start, _, layer in spans:
            alive = [other for s, e, other in spans if s <= start <= e]
            if len(alive) > bound:
                raise ScheduleError(
                    f"{len(alive)} layer buffers of series {name!r} are alive at node {start} "
                    f"({[f'{name}[{a.index}]' for a in alive]}); prefetch_step={k}"
                    f"{f' with {w} window(s) for the next forward' if w else ''} allows {bound}"
                )
    return gm
