"""Slices, the "auto" threshold: time both paths on the model's own layers at shard time, and choose.

Every rank runs the same timed collectives; the slowest rank's times decide everywhere (``agree_costs``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .slice_layout import SLICE_GEMM, decode_linear, gather_slices, gather_source, reassemble
from .timing import time_call

AUTO_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def measure_paths(pg, layers: list, prefetch_step: int, reps: int = 3) -> dict:
    """Per decoder layer (one layer of each series), seconds of the slices path at each candidate
    token count, of the weight gathers, and of the replicated GEMMs. Collectives: every rank runs
    the same sequence. Layers with their own GEMM (``SLICE_GEMM``) take no part: they compute on
    their slices whatever the threshold. None when no layer is left."""
    world = pg.size()
    first = {}
    for sl, module in layers:
        if getattr(module, SLICE_GEMM, None) is None:
            first.setdefault(sl.series, (sl, gather_source(sl.cut, module.weight)))
    if not first:
        return None

    device = next(iter(first.values()))[1].device

    def timed(fn) -> float:  # the work's time, not its launch's: the device is synchronised around it
        return time_call(fn, device, reps=reps)

    def run(what, fn):  # decode_linear's collective hook, with no error translation here
        return fn()

    on_slices, gemm, gather = {}, {}, 0.0
    whole = {}
    for series, (sl, w) in first.items():
        buf = torch.empty((w.shape[0] * world, w.shape[1]), dtype=w.dtype, device=w.device)
        gather += timed(lambda: gather_slices(buf, w, pg))  # w: as gathered (gather_source)
        whole[series] = reassemble(buf, sl.cut)
    for n in AUTO_CANDIDATES:
        on_slices[n], gemm[n] = 0.0, 0.0
        for series, (sl, w) in first.items():
            x = torch.randn(n, sl.shape[1], dtype=w.dtype, device=w.device)
            dist.barrier(group=pg)
            on_slices[n] += timed(lambda: decode_linear(x, gather_source(sl.cut, w), sl.cut, n, pg, run))
            gemm[n] += timed(lambda: F.linear(x, whole[series]))
    return {"slices": on_slices, "gemm": gemm, "gather": gather, "prefetch_step": prefetch_step}


def choose_threshold(costs: dict) -> tuple:
    """``(decode_tokens, explanation)`` from agreed measurements: the largest candidate token count up
    to which the slices path is no slower than the gather path (the gathers overlap the GEMMs when
    prefetching ahead: ``max(gather, gemm)``; at step 0 they add up)."""
    overlap = costs["prefetch_step"] > 0
    chosen, winning = 0, True
    rows = []
    for n in sorted(costs["slices"], key=int):
        gathered = max(costs["gather"], costs["gemm"][n]) if overlap else costs["gather"] + costs["gemm"][n]
        rows.append(f"{n}: slices {costs['slices'][n] * 1e3:.2f} ms, gather {gathered * 1e3:.2f} ms")
        winning = winning and costs["slices"][n] <= gathered
        if winning:
            chosen = int(n)
    return chosen, "; ".join(rows)


def agree_costs(gathered: list) -> dict:
    """The slowest rank's time for every entry: every rank computes the same threshold."""
    first = gathered[0]
    return {
        "slices": {n: max(g["slices"][n] for g in gathered) for n in first["slices"]},
        "gemm": {n: max(g["gemm"][n] for g in gathered) for n in first["gemm"]},
        "gather": max(g["gather"] for g in gathered),
        "prefetch_step": first["prefetch_step"],
    }
