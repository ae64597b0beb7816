"""Per-rank graph dumps: FX code around every pass, the schedule table, a timeline picture.

Layout under ``dump_dir``::

    rank_<r>/graph_<id>/NN_<pass>.before.py, NN_<pass>.after.py, schedule.json, timeline.svg
    rank_<r>/schedule.json, rank_<r>/timeline.svg   (the latest graph with shared weights)

``<r>`` is the global rank (unique per process); ``schedule.json`` also gives the rank in
the sharing group (``"rank"``).

Everything is also emitted as torch structured-trace artifacts (``TORCH_TRACE``), so
``tlparse`` shows it next to the compiler's own output.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from torch import fx
from torch._logging import trace_structured

from ..passes.prefetch import collective_order, order_layers
from ..runtime.marker import layer_name


def compile_id() -> str:
    """Dynamo's id of the frame being compiled ("0_0"), or "0" outside Dynamo."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # pragma: no cover - private API moved
        cid = None
    return re.sub(r"[^0-9A-Za-z]+", "_", str(cid)).strip("_") if cid is not None else "0"


def _artifact(name: str, payload: str, encoding: str = "string") -> None:
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"ascend_compile_{name}", "encoding": encoding},
        payload_fn=lambda: payload,
    )


class GraphDumper:
    """Writes one compiled graph's dumps; a no-op on disk when ``root`` is None."""

    def __init__(self, root: Optional[str], rank: int, graph_id: Optional[str] = None):
        self.root = root
        self.rank = rank
        self.graph_id = graph_id or compile_id()
        self.rank_dir = os.path.join(root, f"rank_{rank}") if root else None
        self.dir = os.path.join(self.rank_dir, f"graph_{self.graph_id}") if root else None
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)

    def _write(self, directory: Optional[str], name: str, text: str) -> None:
        if directory:
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)

    def graph(self, index: int, pass_name: str, phase: str, gm: fx.GraphModule) -> None:
        code = gm.print_readable(print_output=False, include_stride=True, include_device=True)
        name = f"{index:02d}_{pass_name}.{phase}"
        _artifact(f"graph_{self.graph_id}_{name}", code)
        self._write(self.dir, name + ".py", code)

    def schedule(self, table: dict) -> None:
        text = json.dumps(table, indent=2)
        svg = timeline_svg(table)
        _artifact(f"graph_{self.graph_id}_schedule", text, "json")
        _artifact(f"graph_{self.graph_id}_timeline_svg", svg)
        for d in (self.dir, self.rank_dir):
            self._write(d, "schedule.json", text)
            self._write(d, "timeline.svg", svg)


def _end(r: dict, graph_end: int) -> int:
    """Where a row's window stops being alive: its last use; the graph's end for a window that is
    broadcast for the next forward (wrap-around)."""
    if r.get("kind") == "next":
        return graph_end
    return r["last_use"] if r["last_use"] is not None else r["wait"]


def buffers_alive(collectives: list) -> dict:
    """``{series: [(position, layer buffers alive)]}`` at every issue/last-use event (a buffer lives
    from its broadcast to its last use)."""
    out: dict = {}
    graph_end = max((max(r["issue"], r["last_use"] or 0) for r in collectives), default=0) + 1
    for series in sorted({c["series"] for c in collectives}):
        rows = [c for c in collectives if c["series"] == series]
        events = sorted({r["issue"] for r in rows} | {r["last_use"] for r in rows if r["last_use"] is not None})
        out[series] = [(p, sum(1 for r in rows if r["issue"] <= p <= _end(r, graph_end))) for p in events]
    return out


def timeline_svg(table: dict) -> str:
    """One row per collective: issue -> wait (in flight), wait -> last use (buffer in use); a
    broadcast for the next forward (wrap-around) runs from its issue to the end, in green."""
    rows = table.get("collectives", [])
    if not rows:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40"><text x="10" y="25">no shared-weight collectives</text></svg>'
    end = max(max(r["last_use"] or r["wait"] or r["issue"] for r in rows), 1) + 1
    left, width, row_h = 170, 760, 14
    x = lambda p: left + width * p / end  # noqa: E731
    alive = buffers_alive(rows)
    height = 50 + row_h * len(rows) + 30 * len(alive) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{height}" font-family="monospace" font-size="10">',
           f'<text x="10" y="15">rank {table.get("rank")} of {table.get("world_size")}, prefetch_step {table.get("prefetch_step")}: '
           'grey = broadcast in flight, blue = buffer in use, | = wait, green = for the next forward</text>']
    y = 30
    for r in rows:
        label = f'{r["series"]}[{r["index"]}] @{r["owner"]}{" next" if r.get("kind") == "next" else ""}'
        out.append(f'<text x="10" y="{y + 10}">{label}</text>')
        if r.get("kind") == "next":
            out.append(f'<rect x="{x(r["issue"]):.1f}" y="{y}" width="{max(x(end) - x(r["issue"]), 1):.1f}" '
                       f'height="{row_h - 3}" fill="#5b5"/>')
            y += row_h
            continue
        wait = r["wait"] if r["wait"] is not None else r["issue"]
        last = r["last_use"] if r["last_use"] is not None else wait
        out.append(f'<rect x="{x(r["issue"]):.1f}" y="{y}" width="{max(x(wait) - x(r["issue"]), 1):.1f}" height="{row_h - 3}" fill="#bbb"/>')
        out.append(f'<rect x="{x(wait):.1f}" y="{y}" width="{max(x(last) - x(wait), 1):.1f}" height="{row_h - 3}" fill="#4a7fd4"/>')
        out.append(f'<line x1="{x(wait):.1f}" y1="{y - 1}" x2="{x(wait):.1f}" y2="{y + row_h - 2}" stroke="black"/>')
        y += row_h
    y += 10
    for series, points in alive.items():
        peak = max(n for _, n in points)
        out.append(f'<text x="10" y="{y + 12}">{series}: peak {peak} windows</text>')
        path = " ".join(f"{x(p):.1f},{y + 24 - 20 * n / max(peak, 1):.1f}" for p, n in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="#d44" />')
        y += 30
    out.append("</svg>")
    return "\n".join(out)


def slices_table(layers: list, rank: int, tokens: Optional[list] = None) -> dict:
    """``schedule.json`` of a graph with sliced layers (``layout="slices"``): the threshold, and per layer
    its cut, the bytes each path moves, and where the path is known at compile time (``paths="by_shape"``
    and a static size) which path it takes and the collectives it issues. ``layers``: ``sliced_layers``
    of the graph; ``tokens``: ``sliced_token_counts``; ``rank``: the global rank (the table names the
    rank within the sharing group, as the layers layout's does)."""
    from ..runtime import slice_layout, state as shardings

    out = {"rank": rank, "layout": "slices", "sliced": []}
    for (series, index, group, generation), count in zip(layers, tokens or [None] * len(layers)):
        state = shardings.get(group, generation).slices
        layer = state.layers[state.position[(series, index)]]
        world = state.pg.size()
        d_out, d_in = layer.shape
        size = state.modules[state.position[(series, index)]].weight.element_size()
        sent = [d_in / world, d_out] if layer.cut == slice_layout.INPUT_CUT else [d_in, d_out / world]
        out.update(rank=state.pg.rank(), world_size=world, group=group, ranks=_global_ranks(group), decode_tokens=state.decode_tokens,
                   prefetch_step=state.prefetch_step, forwards=dict(state.forwards),
                   paths="by_shape" if state.by_shape else "agreed")
        row = {
            "layer": layer_name(series, index), "module": layer.module, "cut": slice_layout.cut_name(layer.cut),
            "decode_bytes_per_token": int(sum(sent) * size * (world - 1)),
            "gather_bytes": d_out * d_in * size * (world - 1) // world,
            "tokens": count,
        }
        if state.by_shape and count is not None:
            row["path"] = state.path_of(count)
            row["collectives"] = slice_layout.path_collectives(layer.cut, row["path"])
        out["sliced"].append(row)
    return out


def format_schedule(table: dict) -> str:
    """The schedule table as text, as ``ascend-compile explain`` prints it."""
    if table.get("layout") == "slices":
        by_shape = table.get("paths") == "by_shape"
        whose = "its own count, the same on every rank" if by_shape else "the most of any rank"
        lines = [f"rank {table.get('rank')} / world {table.get('world_size')}{_sharing(table)}  layout=slices  "
                 f"paths={table.get('paths', 'agreed')}  sliced layers={len(table['sliced'])}  slices path up to "
                 f"{table.get('decode_tokens')} tokens ({whose}), else gathers {table.get('prefetch_step')} layer(s) "
                 f"ahead; forwards before this compile: {table.get('forwards')}"]
        for r in table["sliced"]:
            line = (f"  {r['layer']:<22} {r['cut']:>6} cut  slices path moves {r['decode_bytes_per_token']} B per token, "
                    f"gather path {r['gather_bytes']} B")
            if r.get("path"):
                line += f"; at {r['tokens']} tokens: {r['path']} path, {', '.join(r['collectives'])}"
            elif by_shape:
                line += "; its size varies: the path of each size, at run time"
            lines.append(line)
        return "\n".join(lines)
    rows = table.get("collectives", [])
    head = (f"rank {table.get('rank')} / world {table.get('world_size')}{_sharing(table)}  "
            f"prefetch_step={table.get('prefetch_step')}  "
            f"collectives={len(rows)}")
    cols = ("#", "series", "index", "owner", "bytes", "issue", "wait", "first_use", "kind")
    width = max([len(c) for c in cols] + [len(str(r["series"])) for r in rows])
    fmt = lambda vals: "  ".join(f"{str(v):>{width if i == 1 else 9}}" for i, v in enumerate(vals))  # noqa: E731
    lines = [head, fmt(cols)]
    for i, r in enumerate(rows):
        lines.append(fmt((i, r["series"], r["index"], r["owner"], r["bytes"], r["issue"], r["wait"], r["first_use"],
                          r.get("kind", "fetch"))))
    for series, points in buffers_alive(rows).items():
        lines.append(f"{series}: at most {max(n for _, n in points)} layer buffer(s) alive")
    for key in ("explain",):
        if table.get(key):
            lines.append(f"{key}: {table[key]}")
    return "\n".join(lines)


def schedule_problems(tables: dict) -> list:
    """What looks wrong in dumped schedules ``{name: schedule.json}``: a broadcast issued after
    its wait or its first use; graphs of one sharding over the same layers (any rank; the runtime
    check's ``order_key``) whose collective orders differ, which would pair the wrong broadcasts
    across ranks and deadlock. Graphs of different models (their own sharing groups) never pair."""
    problems = []
    for name, table in sorted(tables.items()):
        for r in table.get("collectives", []):
            layer = layer_name(r["series"], r["index"])
            if r.get("wait") is not None and r["issue"] > r["wait"]:
                problems.append(f"{name}: {layer} is waited (node {r['wait']}) before its broadcast is issued "
                                f"(node {r['issue']})")
            if r.get("first_use") is not None and r["issue"] >= r["first_use"]:
                problems.append(f"{name}: {layer} is broadcast (node {r['issue']}) at or after its first use "
                                f"(node {r['first_use']}): nothing of the transfer is hidden")
            if r.get("first_use") is not None and r.get("wait") is not None and r["wait"] >= r["first_use"]:
                problems.append(f"{name}: {layer} is used (node {r['first_use']}) before its wait (node {r['wait']})")
    by_key: dict = {}  # graphs whose orders the runtime check compares: the same sharding and layers
    for name, table in sorted(tables.items()):
        order = collective_order(table.get("collectives", []))
        key = table.get("order_key") or (table.get("group"), tuple(order_layers(order)))
        by_key.setdefault(key, []).append((name, [str(c) for c in order]))
    for graphs in by_key.values():
        ref_name, ref = graphs[0]
        for name, order in graphs[1:]:
            if order != ref:
                i = next((i for i, (a, b) in enumerate(zip(ref, order)) if a != b), min(len(ref), len(order)))
                problems.append(
                    f"{ref_name} and {name} fetch the same layers in different orders (first difference at "
                    f"broadcast {i}: {ref[i] if i < len(ref) else 'none'} vs {order[i] if i < len(order) else 'none'}); "
                    "ranks running them together would deadlock"
                )
    return problems


def _global_ranks(group: str):
    """The global ranks of a live process group (a ``share_size`` block's), or None."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return dist.get_process_group_ranks(_resolve_process_group(group))
    except Exception:  # a plan made by hand (tests) names no live group
        return None


def _sharing(table: dict) -> str:
    ranks = table.get("ranks")
    return f" (global ranks {ranks})" if ranks else ""


def schedule_table(plan, rows: list) -> dict:
    """``schedule.json``: the plan's ranks and group, and each collective of ``rows`` (``collective_schedule``)."""
    steps = sorted({r["prefetch_step"] for r in rows})
    return {
        "rank": plan.rank, "world_size": plan.world_size, "group": plan.group_name, "ranks": _global_ranks(plan.group_name),
        "prefetch_step": steps[0] if len(steps) == 1 else steps,
        "collectives": [{k: r[k] for k in ("series", "index", "owner", "bytes", "issue", "wait", "first_use", "last_use", "kind")}
                        for r in rows],
    }
