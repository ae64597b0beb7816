"""``prefetch_step="auto"``: measure what the cost model needs, agree across ranks, choose ``k``.

At compile time of a graph whose markers ask for ``auto``:

- layer bytes and layer count come from the markers in the graph;
- link bandwidth and latency are measured with a few broadcasts over the sharing group (a
  collective: every rank compiles the same graph at the same point, as the schedule check
  already requires);
- compute per layer is estimated from the graph's matmul FLOPs and a measured local matmul;
- every rank gathers every rank's measurements and uses the slowest link and slowest
  compute, so all ranks choose the same ``k`` (else they would deadlock).

``options["cost_model"]`` (``bandwidth`` B/s, ``latency_s``, ``compute_s``,
``memory_budget`` B) replaces any measurement.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import fx

from ..passes.cost_model import Choice, CostInputs, choose_prefetch_step
from ..passes.graph import is_marker, marker_args
from .ops import AUTO_STEP

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


def matmul_flops(gm: fx.GraphModule) -> tuple:
    """Total matmul FLOPs of the graph and the largest (m, k, n) seen."""
    linear = {torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default}
    mms = {torch.mm, torch.matmul, torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    total, biggest = 0, (1, 1, 1)
    for n in gm.graph.nodes:
        if n.op != "call_function" or (n.target not in linear and n.target not in mms):
            continue
        out = _val(n)
        a = _val(n.args[0]) if isinstance(n.args[0], fx.Node) else None
        if n.target is torch.ops.aten.addmm.default:
            a = _val(n.args[1])
        if out is None or a is None:
            continue
        k, numel, n_out = _hint(a.shape[-1]), _hint(out.numel()), _hint(out.shape[-1])
        flops = 2 * numel * k
        total += flops
        if flops > 2 * biggest[0] * biggest[1] * biggest[2]:
            biggest = (numel // max(n_out, 1), k, n_out)
    return total, biggest


def measure_flops_per_s(shape: tuple, repeats: int = 5) -> float:
    m, k, n = (max(int(x), 1) for x in shape)
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * m * k * n * repeats / max(time.perf_counter() - start, 1e-9)


def measure_link(pg, nbytes: int, repeats: int = 5) -> tuple:
    """``(bandwidth B/s, latency s)`` of a broadcast over ``pg`` (a collective): medians of
    single broadcasts, each started together after a barrier."""
    def timed(numel: int) -> float:
        buf = torch.empty(max(numel, 1), dtype=torch.uint8)
        dist.broadcast(buf, group_src=0, group=pg)  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier(group=pg)
            start = time.perf_counter()
            dist.broadcast(buf, group_src=0, group=pg)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    small, big = timed(1), timed(nbytes)
    latency = min(small, big)
    return nbytes / max(big - latency, 0.05 * big, 1e-9), latency


def choose(gm: fx.GraphModule, pg, overrides: Optional[dict] = None) -> Choice:
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(COST_KEYS)
    if unknown:
        from ..config import ConfigError

        raise ConfigError(f"unknown cost_model option(s) {sorted(unknown)}; known: {list(COST_KEYS)}")
    layers, layer_bytes = graph_layers(gm)
    mine = {}
    if "bandwidth" not in overrides or "latency_s" not in overrides:
        mine["bandwidth"], mine["latency_s"] = measure_link(pg, layer_bytes)
    if "compute_s" not in overrides:
        flops, biggest = matmul_flops(gm)
        mine["compute_s"] = flops / max(layers, 1) / measure_flops_per_s(biggest)
    gathered: list = [None] * dist.get_world_size(pg)
    dist.all_gather_object(gathered, mine, group=pg)
    agreed = {}
    if gathered[0]:
        for key in gathered[0]:
            values = [g[key] for g in gathered]
            agreed[key] = min(values) if key == "bandwidth" else max(values)  # the slowest rank sets the pace
    agreed.update(overrides)
    inputs = CostInputs(
        layers=layers, layer_bytes=layer_bytes, window_bytes=layer_bytes,
        bandwidth=float(agreed["bandwidth"]), compute_s=float(agreed["compute_s"]),
        latency_s=float(agreed.get("latency_s", 0.0)), memory_budget=agreed.get("memory_budget"),
    )
    return choose_prefetch_step(inputs)
