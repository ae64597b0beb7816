"""Choose the prefetch step ``k`` from layer bytes, link bandwidth, per-layer compute and memory.

The model simulates one forward of ``N`` layers with two resources: a compute stream that
runs layer ``i`` for ``compute_s`` after its weights arrived, and one link that carries the
broadcasts one after the other in issue order (``latency_s + bytes / bandwidth`` each). The
broadcast of layer ``i`` is issued when the wait of layer ``i - k`` is passed (layers
``< k`` at entry), exactly as ``prefetch.py`` schedules it. ``k`` costs ``(k + 1)`` layer buffers
of memory per series (a fetched layer's buffer lives from its broadcast to its last use).

With wrap-around (``wrap_windows = w``), the first ``w`` layers of a forward were broadcast during
the previous forward, each right after the wait of layer ``N - w + j``; the model then simulates
consecutive forwards and reports the steady one (the first forward, which fetches at entry, is
the plain schedule). Memory: ``max(k, w) + 1`` buffers during a forward, of which the ``w``
windows (the buffers that cross forwards) are held between them.

``choose_prefetch_step`` picks the smallest ``k`` whose simulated time is within ``tolerance`` of
the best ``k`` that fits the memory budget, and says why.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class CostInputs:
    layers: int  # N: layers per series
    layer_bytes: int  # bytes broadcast per decoder layer (all series together)
    buffer_bytes: int  # bytes of one layer buffer of every series (what one more k costs)
    bandwidth: float  # bytes / s of the link, as one broadcast sees it
    compute_s: float  # seconds of compute per decoder layer
    latency_s: float = 0.0
    memory_budget: Optional[int] = None  # bytes available for layer buffers; None = unlimited
    wrap_windows: int = 0  # w: layers per series prefetched for the next forward (wrap-around)

    def buffers(self, k: int) -> int:
        """Layer buffers of every series alive at the peak of a forward with step ``k``."""
        return max(k, self.wrap_windows) + 1 if self.wrap_windows else k + 1


@dataclasses.dataclass(frozen=True)
class Choice:
    k: int
    times: dict  # k -> simulated seconds per forward
    explanation: str


def simulate(inputs: CostInputs, k: int, steps: int = 3) -> float:
    """Seconds for one forward of the stack with prefetch step ``k`` (with wrap-around: the last of
    ``steps`` consecutive forwards, whose first layers were sent during the one before)."""
    n, t_comm = inputs.layers, inputs.latency_s + inputs.layer_bytes / inputs.bandwidth
    w = min(inputs.wrap_windows, max(n - 1, 0))
    link_free = 0.0

    def issue(t: float) -> float:
        nonlocal link_free
        link_free = max(t, link_free) + t_comm  # one link: broadcasts run one after the other
        return link_free

    clock = start = 0.0  # the compute stream, across forwards
    carried: dict = {}  # layer -> arrival of its window, sent during the previous forward
    for _ in range(steps if w else 1):
        start = clock
        arrive: dict = {}
        for i in range(min(max(k, w), n)):  # graph entry: windows (fetched now on the first forward), then layers < k
            arrive[i] = carried[i] if i < w and i in carried else issue(clock)
        carried = {}
        for i in range(n):
            if i not in arrive:  # k == 0: fetched at its use
                arrive[i] = issue(clock)
            clock = max(clock, arrive[i])  # the wait of layer i
            if k > 0 and i + k < n and i + k not in arrive:
                arrive[i + k] = issue(clock)
            if w and i >= n - w:
                carried[i - (n - w)] = issue(clock)  # the next forward's window
            clock += inputs.compute_s
    return clock - start


def choose_prefetch_step(inputs: CostInputs, tolerance: float = 0.01, allowed=None) -> Choice:
    """``allowed(k)``, if given, vetoes steps (tried in order of preference; ``k = 0`` is always allowed)."""
    max_k = max(inputs.layers - 1, 0)
    fits = [k for k in range(max_k + 1)
            if inputs.memory_budget is None or inputs.buffers(k) * inputs.buffer_bytes <= inputs.memory_budget]
    over_budget = not fits  # even the smallest step holds more buffers than the budget allows
    if over_budget:
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
    if over_budget:
        budget = (f", no step fits the memory budget of {inputs.memory_budget / 2**20:.2f} MiB"
                  + (f" (wrap-around holds {inputs.wrap_windows} window(s) per series more; "
                     "SharedWeightConfig(wrap_around=False) drops them)" if inputs.wrap_windows else ""))
    explanation = (
        f"k={k}: broadcast of one layer {t_comm * 1e6:.0f} us ({inputs.layer_bytes / 2**20:.2f} MiB at "
        f"{inputs.bandwidth / 1e9:.2f} GB/s + {inputs.latency_s * 1e6:.0f} us) vs compute {inputs.compute_s * 1e6:.0f} us "
        f"per layer ({regime}); simulated forward {times[k] * 1e3:.3f} ms vs replicated "
        f"{inputs.layers * inputs.compute_s * 1e3:.3f} ms; smallest k within {tolerance:.0%} of the best "
        f"({best * 1e3:.3f} ms){budget}; layer buffers {inputs.buffers(k) * inputs.buffer_bytes / 2**20:.2f} MiB"
    )
    if inputs.wrap_windows:
        explanation += (f"; with {inputs.wrap_windows} window(s) per series sent during the previous forward "
                        f"({inputs.wrap_windows * inputs.buffer_bytes / 2**20:.2f} MiB held between forwards)")
    if vetoed:
        explanation += f"; k={vetoed} not taken: they would change the collective order"
    return Choice(k, times, explanation)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """A decoder stack at device scale, for comparing the layouts per step (``ascend-compile plan``).

    ``series``: ``((name, d_in, d_out), ...)``; ``bytes_per_element`` of their weights. The link model
    is a full mesh: one device's collective that sends ``b`` bytes to each of the others takes
    ``latency_s + b / link_bandwidth`` (its links run in parallel), so a broadcast from one owner moves a
    whole layer over each link while an all-gather of ``1/K`` slices moves ``1/K`` of it. A replicated
    layer takes ``max(flops / flops_per_s, weight bytes / memory_bandwidth)``."""

    series: tuple
    bytes_per_element: float
    layers: int
    ranks: int
    link_bandwidth: float
    memory_bandwidth: float
    flops_per_s: float
    latency_s: float
    params_per_layer: float  # every parameter a token reads per decoder layer (the series included)

    def series_bytes(self) -> float:
        return sum(d_in * d_out for _, d_in, d_out in self.series) * self.bytes_per_element

    def gemm_s(self, tokens: int, params: float) -> float:
        return max(2 * tokens * params / self.flops_per_s, params * self.bytes_per_element / self.memory_bandwidth)

    def replicated_layer_s(self, tokens: int) -> float:
        return self.gemm_s(tokens, self.params_per_layer)

    def rest_layer_s(self, tokens: int) -> float:
        """A layer's time without its series' GEMMs."""
        series = sum(d_in * d_out for _, d_in, d_out in self.series)
        return max(0.0, self.replicated_layer_s(tokens) - self.gemm_s(tokens, series))

    def decode_layer_s(self, tokens: int) -> float:
        """A layer on the slices, moving activations: per series a GEMM reading ``1/K`` of the weight
        over ``K * tokens`` rows, and two collectives (``tokens`` = the largest of any rank)."""
        k, b, t = self.ranks, self.bytes_per_element, self.rest_layer_s(tokens)
        for _, d_in, d_out in self.series:
            flops_s = 2 * tokens * d_in * d_out / self.flops_per_s
            t += max(flops_s, d_in * d_out * b / k / self.memory_bandwidth)
            if d_in > d_out:  # input cut: all-to-all of the inputs, reduce-scatter of the outputs
                sent = [tokens * d_in / k * b, tokens * d_out * b]
            else:  # output cut: all-gather of the inputs, all-to-all of the outputs
                sent = [tokens * d_in * b, tokens * d_out / k * b]
            t += sum(self.latency_s + s / self.link_bandwidth for s in sent)
        return t

    def steps(self, tokens: int, prefetch_step: int = 1, wrap_windows: int = 0) -> dict:
        """Seconds per forward: ``replicated``, ``layers`` (broadcasts from owners), ``slices gather``
        (all-gathers of slices ahead) and ``slices decode`` (activations moved), and the agreement's
        all-reduce on both slices paths."""
        rep = self.replicated_layer_s(tokens)
        whole = self.series_bytes()
        layers = simulate(CostInputs(self.layers, int(whole), int(whole), self.link_bandwidth, rep, self.latency_s,
                                     wrap_windows=wrap_windows), prefetch_step)
        gather = simulate(CostInputs(self.layers, int(whole / self.ranks), int(whole), self.link_bandwidth, rep,
                                     self.latency_s), prefetch_step)
        return {"replicated": self.layers * rep, "layers": layers, "slices gather": gather + self.latency_s,
                "slices decode": self.layers * self.decode_layer_s(tokens) + self.latency_s}

    def decode_threshold(self, prefetch_step: int = 1, limit: int = 1 << 16) -> int:
        """The largest token count (a power of two) up to which the slices path is no slower than gathering."""
        chosen, n = 0, 1
        while n <= limit:
            s = self.steps(n, prefetch_step)
            if s["slices decode"] > s["slices gather"]:
                break
            chosen, n = n, n * 2
        return chosen


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Where a data-parallel group runs, for comparing ``share_size`` (``ascend-compile plan``): blocks
    of up to ``devices_per_machine`` ranks talk over the machine's link (HCCS), larger ones over the
    link between machines (RoCE). ``measured_latency_s``: ``{K: seconds per collective}`` measured on
    the devices (``docs/npu_runbook.md``), used instead of the modelled latency for that size."""

    machines: int
    devices_per_machine: int
    hccs_bandwidth: float  # bytes / s
    roce_bandwidth: float
    hccs_latency_s: float
    roce_latency_s: float
    measured_latency_s: tuple = ()  # ((K, seconds), ...)

    @property
    def devices(self) -> int:
        return self.machines * self.devices_per_machine

    def link(self, size: int) -> tuple:
        """``(bandwidth, latency_s, link name, latency source)`` of a block of ``size`` ranks."""
        inside = size <= self.devices_per_machine
        bandwidth = self.hccs_bandwidth if inside else self.roce_bandwidth
        measured = dict(self.measured_latency_s)
        if size in measured:
            return bandwidth, measured[size], "HCCS" if inside else "RoCE", "measured"
        return bandwidth, self.hccs_latency_s if inside else self.roce_latency_s, "HCCS" if inside else "RoCE", "modelled"


def compare_share_sizes(step: StepInputs, where: Deployment, sizes, decode_tokens: int, prefill_tokens: int,
                        prefetch_step: int = 1) -> list:
    """One row per (size, layout): memory saved per device (the series' ``(K-1)/K``, less the
    ``prefetch_step + 1`` layer buffers a fetch holds at its peak) and the modelled seconds per step at
    decode and at prefill. Sizes that do not divide the group are left out. ``slices`` takes the path
    it would choose at each token count (its slices path up to ``decode_threshold``, else gathers)."""
    layer_bytes = step.series_bytes()
    rows = []
    for size in sizes:
        if size < 2 or where.devices % size:
            continue
        bandwidth, latency, link, source = where.link(size)
        at = dataclasses.replace(step, ranks=size, link_bandwidth=bandwidth, latency_s=latency)
        saved = layer_bytes * step.layers * (size - 1) / size - (prefetch_step + 1) * layer_bytes
        threshold = at.decode_threshold(prefetch_step)
        times = {n: at.steps(n, prefetch_step) for n in (decode_tokens, prefill_tokens)}
        for layout in ("layers", "slices"):
            def t(n):
                s = times[n]
                if layout == "layers":
                    return s["layers"]
                return s["slices decode"] if n <= threshold else s["slices gather"]

            rows.append({"size": size, "layout": layout, "link": link, "latency": source, "saved": saved,
                         "decode_s": t(decode_tokens), "prefill_s": t(prefill_tokens),
                         "replicated_decode_s": times[decode_tokens]["replicated"],
                         "replicated_prefill_s": times[prefill_tokens]["replicated"]})
    return rows


def recommend(rows: list, memory_goal: Optional[float] = None) -> tuple:
    """``(row or None, why)``: the smallest decode step time among the rows that save at least
    ``memory_goal`` bytes per device (ties: the faster prefill, then the smaller size)."""
    fits = [r for r in rows if memory_goal is None or r["saved"] >= memory_goal]
    goal = "" if memory_goal is None else f" among those saving >= {memory_goal / 2**30:.2f} GiB per device"
    if not fits:
        most = max(rows, key=lambda r: r["saved"]) if rows else None
        return None, (f"no size saves {memory_goal / 2**30:.2f} GiB per device"
                      + (f"; the most is {most['saved'] / 2**30:.2f} GiB (share_size={most['size']})" if most else ""))
    best = min(fits, key=lambda r: (r["decode_s"], r["prefill_s"], r["size"]))
    return best, (f"share_size={best['size']}, layout={best['layout']!r}: the fastest decode step{goal} "
                  f"({best['decode_s'] * 1e3:.2f} ms, {best['decode_s'] / best['replicated_decode_s']:.2f}x replicated; "
                  f"saves {best['saved'] / 2**30:.2f} GiB per device)")
