"""Timing shared by the benchmarks: configurations interleaved round by round on every rank."""

from __future__ import annotations

import statistics
import time


def median_seconds(configs: dict, x, rounds: int, calls: int = 3, device=None) -> dict:
    """``{name: median seconds per call}`` of ``configs[name](x)``: each round times ``calls``
    consecutive calls of every configuration in turn (the machines are noisy: neighbours see the same
    noise), after a barrier; a sample is the slowest rank's (a step is as slow as its slowest rank).
    Every rank of the default group must call it with the same configurations. ``device`` (default:
    ``x``'s) is synchronised before the clock starts and before it stops: on an accelerator a call
    only queues work, and the time is the work's, not the launch's."""
    import torch
    import torch.distributed as dist

    from ascend_compile.runtime.timing import synchronize

    device = device if device is not None else getattr(x, "device", "cpu")

    times = {name: [] for name in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            dist.barrier()
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x)
            synchronize(device)
            dt = torch.tensor([(time.perf_counter() - t0) / calls], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times[name].append(float(dt))
    return {name: statistics.median(t) for name, t in times.items()}
