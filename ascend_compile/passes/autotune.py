"""``prefetch_step="auto"`` at compile time: choose ``k`` for a graph, with no communication.

Layer bytes and layer count come from the graph's markers, compute per layer from the graph's
matmul FLOPs at the rate agreed when the model was sharded (``runtime/measure.py``), then the
cost model (``cost_model.py``). ``options["cost_model"]`` (``bandwidth`` B/s, ``latency_s``,
``compute_s``, ``memory_budget`` B) replaces any measurement.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from ..runtime.marker import AUTO_STEP
from .cost_model import Choice, CostInputs, choose_prefetch_step
from .graph import is_marker, marker_args

COST_KEYS = ("bandwidth", "latency_s", "compute_s", "memory_budget")


def wants_auto(gm: fx.GraphModule) -> bool:
    return any(is_marker(n) and marker_args(n).prefetch_step == AUTO_STEP for n in gm.graph.nodes)


def _val(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def graph_layers(gm: fx.GraphModule) -> tuple:
    """``(layers per series, bytes per decoder layer)`` from the markers."""
    per_series: dict = {}
    for n in gm.graph.nodes:
        if is_marker(n):
            a, v = marker_args(n), _val(n)
            per_series.setdefault(a.series, {})[a.index] = _hint(v.numel()) * v.element_size() if v is not None else 0
    layers = max(len(v) for v in per_series.values())
    per_layer = sum(max(v.values()) for v in per_series.values())
    return layers, per_layer


def _hint(v) -> int:
    """A size as a plain int: a symbolic size (dynamic shapes) by the value Dynamo saw, 1 if none."""
    from torch.fx.experimental.symbolic_shapes import hint_int

    return hint_int(v, fallback=1)


def matmul_flops(gm: fx.GraphModule) -> int:
    """Total matmul FLOPs of the graph."""
    linear = {torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default}
    mms = {torch.mm, torch.matmul, torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    total = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or (n.target not in linear and n.target not in mms):
            continue
        out = _val(n)
        a = _val(n.args[0]) if isinstance(n.args[0], fx.Node) else None
        if n.target is torch.ops.aten.addmm.default:
            a = _val(n.args[1])
        if out is None or a is None:
            continue
        total += 2 * _hint(out.numel()) * _hint(a.shape[-1])
    return total


def choose(gm: fx.GraphModule, agreed: dict, overrides: Optional[dict] = None, allowed=None,
           wrap_windows: int = 0) -> Choice:
    """The step for this graph from shard-time measurements ``agreed``; no communication.
    ``allowed(k)`` says whether step ``k`` is acceptable (the caller keeps the collective order);
    ``wrap_windows``: layers per series this graph receives from the previous forward."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(COST_KEYS)
    if unknown:
        from ..config import ConfigError

        raise ConfigError(f"unknown cost_model option(s) {sorted(unknown)}; known: {list(COST_KEYS)}")
    layers, layer_bytes = graph_layers(gm)
    compute_s = overrides.get("compute_s")
    if compute_s is None:
        compute_s = matmul_flops(gm) / max(layers, 1) / agreed["flops_per_s"]
    inputs = CostInputs(
        layers=layers, layer_bytes=layer_bytes, buffer_bytes=layer_bytes,
        bandwidth=float(overrides["bandwidth"] if "bandwidth" in overrides else agreed["bandwidth"]),
        compute_s=float(compute_s),
        latency_s=float(overrides["latency_s"] if "latency_s" in overrides else agreed.get("latency_s", 0.0)),
        memory_budget=overrides.get("memory_budget"), wrap_windows=wrap_windows,
    )
    return choose_prefetch_step(inputs, allowed=allowed)
