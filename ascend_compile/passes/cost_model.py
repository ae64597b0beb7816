"""Choose the prefetch step ``k`` from layer bytes, link bandwidth, per-layer compute and memory.

The model simulates one forward of ``N`` layers with two resources: a compute stream that
runs layer ``i`` for ``compute_s`` after its weights arrived, and one link that carries the
broadcasts one after the other in issue order (``latency_s + bytes / bandwidth`` each). The
broadcast of layer ``i`` is issued when the wait of layer ``i - k`` is passed (layers
``< k`` at entry), exactly as ``prefetch.py`` schedules it. ``k`` costs ``(k + 1)`` windows of
memory per series. ``choose_prefetch_step`` picks the smallest ``k`` whose simulated time is
within ``tolerance`` of the best ``k`` that fits the memory budget, and says why.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class CostInputs:
    layers: int  # N: layers per series
    layer_bytes: int  # bytes broadcast per decoder layer (all series together)
    window_bytes: int  # bytes of one window of every series (what one more k costs)
    bandwidth: float  # bytes / s of the link, as one broadcast sees it
    compute_s: float  # seconds of compute per decoder layer
    latency_s: float = 0.0
    memory_budget: Optional[int] = None  # bytes available for windows; None = unlimited


@dataclasses.dataclass(frozen=True)
class Choice:
    k: int
    times: dict  # k -> simulated seconds per forward
    explanation: str


def simulate(inputs: CostInputs, k: int) -> float:
    """Seconds for one forward of the stack with prefetch step ``k``."""
    n, t_comm = inputs.layers, inputs.latency_s + inputs.layer_bytes / inputs.bandwidth
    link_free = 0.0
    arrive = [0.0] * n

    def issue(i: int, t: float) -> None:
        nonlocal link_free
        link_free = max(t, link_free) + t_comm  # one link: broadcasts run one after the other
        arrive[i] = link_free

    for i in range(min(k, n)):
        issue(i, 0.0)
    clock = 0.0  # the compute stream
    for i in range(n):
        if k == 0:
            issue(i, clock)
        clock = max(clock, arrive[i])  # the wait of layer i
        if 0 < k and i + k < n:
            issue(i + k, clock)
        clock += inputs.compute_s
    return clock


def choose_prefetch_step(inputs: CostInputs, tolerance: float = 0.01, allowed=None) -> Choice:
    """``allowed(k)``, if given, vetoes steps (tried in order of preference; ``k = 0`` is always allowed)."""
    max_k = max(inputs.layers - 1, 0)
    fits = [k for k in range(max_k + 1)
            if inputs.memory_budget is None or (k + 1) * inputs.window_bytes <= inputs.memory_budget]
    if not fits:
        fits = [0]
    times = {k: simulate(inputs, k) for k in fits}
    best = min(times.values())
    near = sorted(k for k, t in times.items() if t <= best * (1 + tolerance))
    rest = sorted((k for k in times if k not in near), key=lambda k: (times[k], k))
    vetoed = []
    for k in near + rest:
        if k == 0 or allowed is None or allowed(k):
            break
        vetoed.append(k)
    t_comm = inputs.latency_s + inputs.layer_bytes / inputs.bandwidth
    regime = "compute-bound" if t_comm <= inputs.compute_s else "comm-bound"
    budget = "" if inputs.memory_budget is None else f", memory budget allows k <= {max(fits)}"
    explanation = (
        f"k={k}: broadcast of one layer {t_comm * 1e6:.0f} us ({inputs.layer_bytes / 2**20:.2f} MiB at "
        f"{inputs.bandwidth / 1e9:.2f} GB/s + {inputs.latency_s * 1e6:.0f} us) vs compute {inputs.compute_s * 1e6:.0f} us "
        f"per layer ({regime}); simulated forward {times[k] * 1e3:.3f} ms vs replicated "
        f"{inputs.layers * inputs.compute_s * 1e3:.3f} ms; smallest k within {tolerance:.0%} of the best "
        f"({best * 1e3:.3f} ms){budget}; windows {(k + 1) * inputs.window_bytes / 2**20:.2f} MiB"
    )
    if vetoed:
        explanation += f"; k={vetoed} not taken: they would change the collective order"
    return Choice(k, times, explanation)
