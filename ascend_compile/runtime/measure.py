"""``prefetch_step="auto"`` at shard time: measure the link and the matmul rate, agree across ranks.

Measurements that need other ranks are taken when the model is sharded (``shard_model``, the
one point every rank reaches together), never when a graph compiles: ranks compile at
different calls (a new shape on one rank only), and a collective there would pair with the
other rank's broadcasts. Link bandwidth and latency come from a few broadcasts of one decoder
layer's bytes over the sharing group, the matmul rate from a local matmul on the shared layers'
shape; every rank gathers every rank's numbers and keeps the slowest link and the slowest
matmul rate, so the inputs are identical on every rank. The choice of ``k`` per graph, from
these numbers, is compile time: ``passes/autotune.py``.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .timing import synchronize

def measure_flops_per_s(shape: tuple, repeats: int = 5, dtype=torch.float32, device="cpu") -> float:
    m, k, n = (max(int(x), 1) for x in shape)
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
    return 2 * m * k * n * repeats / max(time.perf_counter() - start, 1e-9)


def measure_link(pg, nbytes: int, repeats: int = 5, device="cpu") -> tuple:
    """``(bandwidth B/s, latency s)`` of a broadcast over ``pg`` (a collective: shard time only):
    medians of single broadcasts, each started together after a barrier."""
    def timed(numel: int) -> float:
        buf = torch.empty(max(numel, 1), dtype=torch.uint8, device=device)
        dist.broadcast(buf, group_src=0, group=pg)  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier(group=pg)
            synchronize(device)
            start = time.perf_counter()
            dist.broadcast(buf, group_src=0, group=pg)
            synchronize(device)
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
