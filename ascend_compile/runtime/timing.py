"""Timing device work by waiting for it: every measurement the project takes goes through here.

On an accelerator (NPU, GPU) a call only queues work on a stream and returns; ``perf_counter``
around it measures the launch. ``time_call`` synchronises the device before starting the clock
and before stopping it, so a measurement is the time the work took. On the CPU synchronising is
a no-op.
"""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device) -> None:
    """Wait for all work queued on ``device`` (a ``torch.device``, its string, or anything with a
    ``type``): ``torch.<type>.synchronize`` (``torch.npu``, ``torch.cuda``, ...); nothing on the CPU."""
    kind = device if isinstance(device, str) else getattr(device, "type", None)
    kind = kind.split(":")[0] if isinstance(kind, str) else kind
    if kind in ("cpu", "meta", None):
        return
    module = getattr(torch, kind, None)
    if module is None or not hasattr(module, "synchronize"):
        raise RuntimeError(f"cannot time work on a {kind!r} device: torch.{kind}.synchronize does not exist")
    module.synchronize()


def time_call(fn, device, reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` on ``device``, each call timed from a synchronised device to the
    end of its work (not of its launch), after ``warmup`` calls (first calls allocate and connect)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
