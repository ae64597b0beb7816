"""Small aten graphs with shared-weight markers, traced without any process group.

``stack_graph(n, series, k)`` is the graph Inductor's post-grad passes would see for a
stack of ``n`` layers, each applying one linear per series in ``series``.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ascend_compile  # noqa: F401  (registers the marker op)
from ascend_compile.passes import CompilePlan

GROUP = "test_group"
IN, OUT = 8, 8


def plan(k=None, rank=0, world=2, pin=False, inplace=False) -> CompilePlan:
    return CompilePlan(rank=rank, world_size=world, group_name=GROUP, prefetch_step=k, pin_order=pin, inplace=inplace)


def stack_graph(n: int = 4, series=("o_proj",), k: int = 1, world: int = 2, reuse_first_at_end: bool = False,
                wrap: int = 0, layers=None):
    """Trace ``h = tanh(h @ W_s_i.T)`` for every layer i and series s, weights via the marker.
    ``wrap``/``layers`` (``{series: model length}``, default ``n``) are the markers' wrap-around args."""
    lengths = {name: (layers or {}).get(name, n) for name in series}

    def f(x, *ws):
        h = x
        for i in range(n):
            for s_i, name in enumerate(series):
                w = torch.ops.ascend_compile.shared_weight(ws[i * len(series) + s_i], f"{name}.weight", i, i % world, GROUP, k,
                                                           wrap, lengths[name])
                h = torch.tanh(torch.mm(h, w.t()))
        if reuse_first_at_end:
            w0 = torch.ops.ascend_compile.shared_weight(ws[0], f"{series[0]}.weight", 0, 0, GROUP, k)
            h = h + torch.mm(h, w0.t())
        return h

    inputs = [torch.randn(4, IN)] + [torch.randn(OUT, IN) for _ in range(n * len(series))]
    return make_fx(f, tracing_mode="fake")(*inputs)


def targets(gm) -> list:
    from ascend_compile.passes.graph import inner_target

    return [inner_target(node) for node in gm.graph.nodes if node.op == "call_function"]


def count(gm, *ops) -> int:
    return sum(1 for t in targets(gm) if t in ops)
