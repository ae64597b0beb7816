"""Prefetch across steps: step time with and without wrap-around, as ratios to replicated.

2 CPU ranks (gloo). One DeepSeek-shaped stack, compute-bound (a layer's compute outlasts its
broadcasts), timed in the same processes, interleaved round by round; each sample is the
mean of ``--steps`` consecutive forwards (the windows of one forward are consumed by the next):

- ``replicated``          unsharded model, Inductor (1.00)
- ``shared k=1``          ``backend="ascend_compile"``, wrap-around on (the default): the first
                          layer of each series travels during the last layer of the forward before
- ``shared k=1 no wrap``  ``SharedWeightConfig(wrap_around=False)``: it is broadcast at entry
- ``comm only``           the same broadcasts with no compute

Expected gain of wrap-around per forward: one decoder layer's broadcasts (``comm only / layers``),
as long as the last layer's compute hides them. The gain is reported in those units.

``--offload-ms S``: every decoder layer also "computes" for ``S`` ms without the CPU (a sleep in
an opaque op after the layer), as a layer does on an NPU while HCCL moves bytes on its own
engines. On this machine gloo moves the bytes with CPU threads that compete with the real
compute, so an overlap hides little of a transfer whatever the schedule; with the CPU left free
the schedule's own effect shows.

Run: ``python benchmarks/wrap_around.py``; writes ``benchmarks/results/wrap_around.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SHAPE = {"tokens": 256, "layers": 4, "hidden": 1024}
SERIES = ["o_proj", "q_b_proj"]


def _offloaded(model, ms: float):
    """Each decoder layer also spends ``ms`` without the CPU (an opaque op after it)."""
    import torch

    if not ms:
        return model
    if not hasattr(torch.ops, "wrap_bench") or not hasattr(torch.ops.wrap_bench, "device_compute"):
        @torch.library.custom_op("wrap_bench::device_compute", mutates_args=(), schema="(Tensor h, float ms) -> Tensor")
        def device_compute(h: torch.Tensor, ms: float) -> torch.Tensor:
            time.sleep(ms / 1e3)
            return h.clone()

        @device_compute.register_fake
        def _(h, ms):
            return torch.empty_like(h)

    for layer in model.layers:
        layer.register_forward_hook(lambda m, args, out: torch.ops.wrap_bench.device_compute(out, ms))
    return model


def _rank(rank, world, shape, rounds, steps, offload_ms):
    import torch

    import ascend_compile as ac
    from ascend_compile.models import StackShape, build_stack, make_input
    from step_time import broadcasts_alone
    from timing import median_seconds

    torch._dynamo.config.recompile_limit = 64
    s = StackShape.scaled(shape["layers"], shape["hidden"])
    x = make_input(s, shape["tokens"])
    configs = {"replicated": torch.compile(_offloaded(build_stack(s), offload_ms), backend="inductor")}
    for name, wrap in (("shared k=1", True), ("shared k=1 no wrap", False)):
        m = _offloaded(build_stack(s), offload_ms)
        ac.shard_model(m, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1, wrap_around=wrap))
        configs[name] = torch.compile(m, backend="ascend_compile")
    configs["comm only"] = broadcasts_alone(build_stack(s), SERIES, world)
    with torch.no_grad():
        expected = configs["replicated"](x)
        for name, fn in configs.items():  # compile, warm up, and check the shared ones
            for _ in range(3):
                out = fn(x)
            if name.startswith("shared") and not torch.equal(out, expected):
                raise AssertionError(f"{name}: output differs from the replicated model")
        return median_seconds(configs, x, rounds, calls=steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=10, help="consecutive forwards per sample")
    p.add_argument("--tokens", type=int, default=SHAPE["tokens"])
    p.add_argument("--layers", type=int, default=SHAPE["layers"])
    p.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    p.add_argument("--offload-ms", type=float, default=0.0, help="per layer, compute that leaves the CPU free")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ascend_compile.launch import spawn

    shape = {"tokens": a.tokens, "layers": a.layers, "hidden": a.hidden}
    med = spawn(_rank, 2, shape, a.rounds, a.steps, a.offload_ms, timeout=3600)[0]
    base, comm = med["replicated"], med["comm only"]
    per_layer = comm / shape["layers"]
    gain = med["shared k=1 no wrap"] - med["shared k=1"]
    report = {
        "machine": f"{os.cpu_count()} cores, 2 gloo ranks on 127.0.0.1", "shape": shape, "series": SERIES,
        "offload_ms_per_layer": a.offload_ms,
        "rounds": a.rounds, "steps_per_sample": a.steps,
        "vs_replicated": {name: t / base for name, t in med.items()},
        "one_layer_broadcast_vs_replicated": per_layer / base,
        "wrap_gain_in_layer_broadcasts": gain / per_layer,
        "median_ms": {name: t * 1e3 for name, t in med.items()},
    }
    print(f"shape {shape}, series {SERIES}, {a.rounds} rounds of {a.steps} forwards, "
          f"{a.offload_ms} ms per layer without the CPU; replicated (Inductor) = 1.00")
    for name, r in report["vs_replicated"].items():
        print(f"  {name:<20} {r:6.3f}")
    print(f"one layer's broadcasts = {report['one_layer_broadcast_vs_replicated']:.3f} of a replicated step; "
          f"wrap-around saved {report['wrap_gain_in_layer_broadcasts']:.2f} of them per forward")
    os.makedirs(a.out_dir, exist_ok=True)
    name = "wrap_around.json" if not a.offload_ms else "wrap_around_offload.json"
    with open(os.path.join(a.out_dir, name), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
