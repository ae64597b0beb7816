"""Rewrite each ``shared_weight`` marker into ``broadcast`` + ``wait_tensor``.

After this pass the graph holds, per shared parameter, one ``_c10d_functional`` broadcast
(``src`` = the owner's group rank) and one ``wait_tensor`` whose result replaces the
marker's. Both sit where the marker was; ``prefetch.py`` moves them.

With ``plan.inplace`` (lowerings that accept mutation after functionalization: Inductor,
aot_eager, eager) the broadcast is ``broadcast_``: the owner sends from its parameter and
every other rank receives into a fresh ``empty`` buffer, so no rank copies a layer. Without
it (torchair, whose converters take the functional op) the functional ``broadcast`` clones
its input first, a layer-sized copy on every rank.

A weight stored in an NPU format other than row-major (FRACTAL_NZ, ``plan.formats``) is
received into ``ascend_compile::receive_buffer`` in that format, on every path.

With wrap-around (``plan.wrap``: the first ``w`` layers read of a series this graph holds whole), those
layers become ``window_fetch`` (issue) + ``window_wait`` (wait) + ``window_prefetch`` (next: the
broadcast of the same layer for the next forward), all on every rank (runtime/windows.py); the
prefetch pass places them.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import fx

from ..runtime.windows import window_targets
from .graph import BUFFER, ISSUE, NEXT, TAG, WAIT, MarkerArgs, _c10d, is_marker, marker_args
from .plan import CompilePlan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SharedWeightMatch:
    node: fx.Node
    args: MarkerArgs

    def replace(self, plan: CompilePlan, window: bool = False) -> fx.Node:
        a, graph = self.args, self.node.graph
        if a.group_name != plan.group_name:
            raise ValueError(
                f"{self.node.name}: {a.series}[{a.index}] is shared over group {a.group_name!r} but this "
                f"compile plan is for group {plan.group_name!r}; shard all series over one group"
            )
        val = self.node.meta.get("val", self.node.meta.get("example_value"))
        nbytes = val.numel() * val.element_size() if val is not None else None
        info = {"series": a.series, "index": a.index, "owner": a.owner, "bytes": nbytes}
        new = []
        fmt = plan.format_of(a.series, a.index)
        if window and val is None:
            raise ValueError(f"{self.node.name}: {a.series}[{a.index}] is prefetched across steps but the graph does "
                             "not say its shape: cannot make its window")
        if fmt is not None and val is None:
            raise ValueError(f"{self.node.name}: {a.series}[{a.index}] is stored in NPU format {fmt} but the "
                             "graph does not say its shape: cannot make its receive buffer")
        with graph.inserting_before(self.node):
            if window:
                ops = window_targets()
                args = (a.series, a.index, a.owner, a.group_name)
                issue = graph.call_function(ops["fetch"], (a.weight, *args))
                wait = graph.call_function(ops["wait"], (issue, a.weight, *args))
                nxt = graph.call_function(ops["next"], (a.weight, wait, wait, None, *args))  # placed by the prefetch pass
                new.append((nxt, NEXT))
            elif plan.inplace and val is not None:
                # No copy: the owner sends its own parameter (a broadcast leaves the source as it
                # is); the others receive into a fresh buffer, never reading their stand-in.
                if a.owner == plan.rank:
                    buf = a.weight
                else:
                    buf = self._buffer(graph, val, fmt)
                    new.append((buf, BUFFER))
                issue = graph.call_function(_c10d.broadcast_.default, (buf, a.owner, a.group_name))
            else:
                src = a.weight
                if fmt is not None and a.owner != plan.rank:  # the functional broadcast receives into a
                    src = self._buffer(graph, val, fmt)        # clone of its input: give it the owner's format
                    new.append((src, BUFFER))
                issue = graph.call_function(_c10d.broadcast.default, (src, a.owner, a.group_name))
            if not window:
                wait = graph.call_function(_c10d.wait_tensor.default, (issue,))
        for n, role in new + [(issue, ISSUE), (wait, WAIT)]:
            if val is not None:
                n.meta["val"] = val if not (window and role in (ISSUE, NEXT)) else val.new_empty(1)
            n.meta[TAG] = dict(info, role=role, prefetch_step=plan.step_for(a.prefetch_step, a.series), window=window)
            n.meta["stack_trace"] = self.node.meta.get("stack_trace")
        self.node.replace_all_uses_with(wait)
        graph.erase_node(self.node)
        return wait

    @staticmethod
    def _buffer(graph: fx.Graph, val, fmt) -> fx.Node:
        """A receive buffer: ``empty``, or in the owner's NPU storage format (FRACTAL_NZ)."""
        if fmt is None:
            return graph.call_function(torch.ops.aten.empty.memory_format, (list(val.shape),),
                                       {"dtype": val.dtype, "device": val.device})
        return graph.call_function(torch.ops.ascend_compile.receive_buffer.default,
                                   (list(val.shape), val.dtype, val.device, fmt))

    def reuse(self, wait: fx.Node) -> None:
        """A second read of the same parameter in one graph: use the first fetch (one collective)."""
        self.node.replace_all_uses_with(wait)
        self.node.graph.erase_node(self.node)


def find_shared_weights(graph: fx.Graph) -> list:
    return [SharedWeightMatch(n, marker_args(n)) for n in graph.nodes if is_marker(n)]


def window_layers(graph: fx.Graph, matches: list, plan: CompilePlan) -> set:
    """``{(series, index)}`` fetched from windows: the first ``plan.wrap_of(series)`` layers of each
    series in order of first use (the ones the previous forward can send during its last layers)."""
    if not plan.wrap:
        return set()
    pos = {n: i for i, n in enumerate(graph.nodes)}
    first_use: dict = {}
    for m in matches:
        key = (m.args.series, m.args.index)
        use = min((pos[u] for u in m.node.users), default=pos[m.node])
        first_use[key] = min(first_use.get(key, use), use)
    out = set()
    for series in {s for s, _ in first_use}:
        keys = sorted((k for k in first_use if k[0] == series), key=first_use.__getitem__)
        out.update(keys[:plan.wrap_of(series)])
    return out


def rewrite_shared_weights(gm: fx.GraphModule, plan: CompilePlan) -> fx.GraphModule:
    """Replace every marker with broadcast + wait: exactly one pair per shared parameter read
    in the graph (repeated reads of one parameter share the first fetch). No marker is left."""
    matches = find_shared_weights(gm.graph)
    if not matches:
        log.debug("rewrite_shared_weights: no shared_weight markers in graph")
    windows = window_layers(gm.graph, matches, plan)
    fetched: dict = {}
    for m in matches:
        key = (m.args.series, m.args.index)
        if key in fetched:
            m.reuse(fetched[key])
        else:
            fetched[key] = m.replace(plan, window=key in windows)
    gm.graph.lint()
    gm.recompile()
    return gm
