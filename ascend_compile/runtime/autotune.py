"""``prefetch_step="auto"``: measure at shard time, agree across ranks, choose ``k`` per graph.

Measurements that need other ranks are taken when the model is sharded (``shard_model``, the
one point every rank reaches together), never when a graph compiles: ranks compile at
different calls (a new shape on one rank only), and a collective there would pair with the
other rank's broadcasts.

- At shard time: link bandwidth and latency from a few broadcasts of one decoder layer's bytes
  over the sharing group, and a local matmul rate on the shared layers' shape; every rank
  gathers every rank's numbers and keeps the slowest link and the slowest matmul rate, so the
  inputs are identical on every rank.
- At compile time (no communication): layer bytes and layer count from the graph's markers,
  compute per layer from the graph's matmul FLOPs at the agreed rate, then the cost model.

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


def measure_flops_per_s(shape: tuple, repeats: int = 5, dtype=torch.float32, device="cpu") -> float:
    m, k, n = (max(int(x), 1) for x in shape)
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    torch.mm(a, b)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _sync(device)
    return 2 * m * k * n * repeats / max(time.perf_counter() - start, 1e-9)


def _sync(device) -> None:
    device = torch.device(device)
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def measure_link(pg, nbytes: int, repeats: int = 5, device="cpu") -> tuple:
    """``(bandwidth B/s, latency s)`` of a broadcast over ``pg`` (a collective: shard time only):
    medians of single broadcasts, each started together after a barrier."""
    def timed(numel: int) -> float:
        buf = torch.empty(max(numel, 1), dtype=torch.uint8, device=device)
        dist.broadcast(buf, group_src=0, group=pg)  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier(group=pg)
            start = time.perf_counter()
            dist.broadcast(buf, group_src=0, group=pg)
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    small, big = timed(1), timed(nbytes)
    latency = min(small, big)
    return nbytes / max(big - latency, 0.05 * big, 1e-9), latency


MATMUL_TOKENS = 256  # rows of the shard-time matmul that measures the compute rate


LINK_BYTES_MAX = 64 << 20  # enough to see a link's bandwidth; bounds the shard-time buffer
MATMUL_DIM_MAX = 4096


def measure_at_shard(pg, layer_bytes: int, weight_shape: tuple, dtype, device) -> dict:
    """This rank's link and matmul measurements (the link part is a collective: shard time only)."""
    bandwidth, latency = measure_link(pg, min(layer_bytes, LINK_BYTES_MAX), device=device)
    out_features, in_features = (
        (min(weight_shape[0], MATMUL_DIM_MAX), min(weight_shape[-1], MATMUL_DIM_MAX)) if len(weight_shape) >= 2 else (1, 1))
    if not dtype.is_floating_point:  # a quantized weight (int8 ...): its matmul runs in the activation dtype
        dtype = torch.bfloat16 if torch.device(device).type != "cpu" else torch.float32
    rate = measure_flops_per_s((MATMUL_TOKENS, in_features, out_features), dtype=dtype, device=device)
    return {"bandwidth": bandwidth, "latency_s": latency, "flops_per_s": rate}


def agree(measured: list) -> dict:
    """Every rank's measurements -> the slowest link and matmul rate: the same on every rank."""
    return {
        "bandwidth": min(m["bandwidth"] for m in measured),
        "latency_s": max(m["latency_s"] for m in measured),
        "flops_per_s": min(m["flops_per_s"] for m in measured),
    }


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
        flops, _ = matmul_flops(gm)
        compute_s = flops / max(layers, 1) / agreed["flops_per_s"]
    inputs = CostInputs(
        layers=layers, layer_bytes=layer_bytes, window_bytes=layer_bytes,
        bandwidth=float(overrides["bandwidth"] if "bandwidth" in overrides else agreed["bandwidth"]),
        compute_s=float(compute_s),
        latency_s=float(overrides["latency_s"] if "latency_s" in overrides else agreed.get("latency_s", 0.0)),
        memory_budget=overrides.get("memory_budget"), wrap_windows=wrap_windows,
    )
    return choose_prefetch_step(inputs, allowed=allowed)
