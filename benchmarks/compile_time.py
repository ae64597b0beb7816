"""Compile-time overhead of the shared-weight passes on a 61-layer graph with two series.

On 2 CPU ranks: compile the unsharded 61-layer DeepSeek-shaped stack with plain Inductor and
the sharded one (``o_proj`` + ``q_b_proj``) with ``backend="ascend_compile"``, both with
Inductor's FX graph cache off. Reports total compile time (first call minus a warm call),
the time of each of our passes, and the ratios. Writes ``benchmarks/results/compile_time.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def _rank(rank, world, layers):
    import torch

    import ascend_compile as ac
    from ascend_compile.models import StackShape, build_stack, make_input

    torch._dynamo.config.recompile_limit = 64
    shape = StackShape(layers=layers)
    x = make_input(shape, 4)

    def first_call(fn):
        start = time.perf_counter()
        fn(x)
        first = time.perf_counter() - start
        start = time.perf_counter()
        fn(x)
        return first - (time.perf_counter() - start)

    out = {}
    patches = {"fx_graph_cache": False}
    out["inductor"] = first_call(torch.compile(build_stack(shape), backend="inductor", options=patches))
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj", "q_b_proj"], prefetch_step=1))
    d = tempfile.mkdtemp()
    out["ascend_compile"] = first_call(torch.compile(
        model, backend="ascend_compile", options={"inductor": patches, "dump_dir": d}))
    with open(os.path.join(d, f"rank_{rank}", "schedule.json")) as f:
        table = json.load(f)
    out["passes"] = table["pass_seconds"]
    out["collectives"] = len(table["collectives"])
    return out


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ascend_compile.launch import spawn

    layers = int(os.environ.get("LAYERS", "61"))
    r = spawn(_rank, 2, layers, timeout=3600)[0]
    passes = sum(r["passes"].values())
    print(f"{layers}-layer stack, 2 series, {r['collectives']} collectives, rank 0:")
    print(f"  plain Inductor compile      {r['inductor']:7.2f} s")
    print(f"  ascend_compile compile      {r['ascend_compile']:7.2f} s  ({r['ascend_compile'] / r['inductor']:.2f} x)")
    print(f"  of which our passes         {passes:7.3f} s  ({passes / r['ascend_compile']:.1%} of it): "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["passes"].items()))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile_time.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(r, layers=layers), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
