"""Decode and prefill step time on 2 CPU ranks (gloo): replicated = 1.00 vs ``layout="layers"`` vs
``layout="slices"``, with a different token count on each rank.

Configurations, on the same DeepSeek-shaped stack (``o_proj`` and ``q_b_proj`` shared), timed in the
same processes, interleaved round by round (only ratios within one run are reported):

- ``replicated``              unsharded model, Inductor (1.00)
- ``layers k=1``              whole layers broadcast one ahead (wrap-around on)
- ``slices``                  ``decode_tokens=64``: decode forwards compute on the slices and move
                              activations; prefill forwards gather each weight one layer ahead. The
                              path is agreed in every forward (an all-reduce of the token counts and
                              a host sync: ``paths="agreed"``, the default)
- ``slices by shape``         the same with ``paths="by_shape"``: each rank's batch padded to the
                              phase's largest (as vLLM's DP padding does under graph capture), the
                              path fixed by that size, nothing agreed (what a captured graph runs).
                              ``slices`` minus this is the agreement's cost per forward
- ``slices auto``             ``decode_tokens="auto"``: the threshold measured at shard time
- ``slices gather-only``      ``decode_tokens=0``: every forward gathers the weights (what the decode
                              path saves)

Phases: ``decode`` (rank 0 runs 4 tokens, rank 1 runs 1, as an idle DP rank's dummy forward) and
``prefill`` (256 and 128 tokens). Sizes: hidden 1024 (o_proj 8 MB fp32) and 2048 (32 MB), where
a decode GEMM reads its weight from memory.

Run: ``python benchmarks/decode.py``; writes ``benchmarks/results/decode.json``.

On a device, start it under torchrun, one process per device, with the process group's backend:
``torchrun --nproc-per-node 8 benchmarks/decode.py --device npu --backend hccl --lowering aot_eager``
(``--device cuda --backend nccl`` likewise). Every timing synchronises the device before the clock
starts and before it stops (``ascend_compile.runtime.timing``), so it measures the work, not its
launch. Rank 0 prints and writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SERIES = ["o_proj", "q_b_proj"]
PHASES = {"decode": (4, 1), "prefill": (256, 128)}


CONFIGS = ("replicated", "layers k=1", "slices", "slices by shape", "slices auto", "slices gather-only")


def _rank(rank, world, hidden, layers, rounds, wanted=CONFIGS, device="cpu", lowering=None):
    import torch

    import ascend_compile as ac
    from ascend_compile.models import StackShape, build_stack, make_input
    from ascend_compile.runtime import state as shardings
    from timing import median_seconds  # benchmarks/

    torch._dynamo.config.recompile_limit = 64
    shape = StackShape.scaled(layers, hidden)
    options = {"lowering": lowering} if lowering else None
    # every configuration through our backend: a graph without shared weights is lowered unchanged
    # (Inductor on CPU), so the replicated 1.00 and the shared ones use the same lowering
    compile_ = lambda m: torch.compile(m, backend="ascend_compile", options=options)  # noqa: E731

    def build():
        return build_stack(shape).to(device)

    configs, plans = {}, {}
    configs["replicated"] = compile_(build())
    if "layers k=1" in wanted:
        m = build()
        plans["layers k=1"] = ac.shard_model(m, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1))
        configs["layers k=1"] = compile_(m)
    for name, threshold in (("slices", 64), ("slices auto", "auto"), ("slices gather-only", 0)):
        if name not in wanted:
            continue
        m = build()
        plans[name] = ac.shard_model(m, ac.SharedWeightConfig(layers=SERIES, layout="slices", decode_tokens=threshold))
        configs[name] = compile_(m)
    pad_to = {"tokens": 0}  # the phase's largest batch: every rank runs it with paths="by_shape"
    if "slices by shape" in wanted:
        m = build()
        plans["slices by shape"] = ac.shard_model(m, ac.SharedWeightConfig(layers=SERIES, layout="slices",
                                                                          decode_tokens=64, paths="by_shape"))
        by_shape = compile_(m)

        def padded(x):
            n = x.shape[0]
            full = x if n == pad_to["tokens"] else torch.cat([x, x.new_zeros(pad_to["tokens"] - n, x.shape[1])])
            return by_shape(full)[:n]

        configs["slices by shape"] = padded
    inputs = {phase: make_input(shape, tokens=counts[min(rank, 1)], seed=7).to(device) for phase, counts in PHASES.items()}
    ref = build()
    out = {"times": {}, "max_rel_diff": {}, "paths": {}}
    with torch.no_grad():
        for phase, x in inputs.items():
            pad_to["tokens"] = max(PHASES[phase])
            want = ref(x)
            for name, fn in configs.items():
                fn(x)
                got = fn(x)
                diff = float((got - want).abs().max() / want.abs().max())
                out["max_rel_diff"][f"{phase} {name}"] = diff
            out["times"][phase] = median_seconds(configs, x, rounds)
            for name, plan in plans.items():
                if plan.layout == "slices":
                    state = shardings.get(plan.group_name, plan.generation).slices
                    out["paths"][f"{phase} {name}"] = (state.path_of(pad_to["tokens"]) + " (by shape)"
                                                       if state.by_shape else state.path)
    if "layers k=1" in configs:
        ac.drain_prefetch(configs["layers k=1"]._orig_mod)
    out["memory"] = {name: {"saved_bytes": p.saved_bytes(), "series_bytes": p.series_bytes(),
                            "decode_tokens": p.decode_tokens, "explanation": p.decode_explanation}
                     for name, p in plans.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                   help="which to run (replicated always runs: it is the 1.00)")
    p.add_argument("--out-name", default="decode.json")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--device", default="cpu", help="under torchrun: the device type of each rank (npu, cuda)")
    p.add_argument("--backend", default=None, help="under torchrun: the process group's backend (hccl, nccl, gloo)")
    p.add_argument("--lowering", default=None, help="the ascend_compile lowering (default: the backend's own)")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ascend_compile.launch import spawn

    if "RANK" in os.environ:  # under torchrun: this process is one rank, on its own device
        import torch
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = a.device if a.device == "cpu" else f"{a.device}:{int(os.environ.get('LOCAL_RANK', rank))}"
        if a.device != "cpu":
            getattr(torch, a.device).set_device(device)
        dist.init_process_group(a.backend or ("gloo" if a.device == "cpu" else None))
        machine = f"{world} ranks, {a.device}, {dist.get_backend()}"

        def run(hidden):
            return _rank(rank, world, hidden, a.layers, a.rounds, tuple(a.configs), device, a.lowering)
    else:
        rank, machine = 0, f"{os.cpu_count()} cores, 2 gloo ranks on 127.0.0.1"

        def run(hidden):
            return spawn(_rank, 2, hidden, a.layers, a.rounds, tuple(a.configs), "cpu", a.lowering, timeout=3600)[0]

    report = {"machine": machine, "tokens_per_rank": PHASES, "layers": a.layers, "sizes": {}}
    for hidden in a.hidden:
        res = run(hidden)
        if rank != 0:
            continue
        entry = {"o_proj_mb": 2 * hidden * hidden * 4 / 2**20, "phases": {}, "memory": res["memory"],
                 "paths": res["paths"], "max_rel_diff": res["max_rel_diff"]}
        print(f"\n== hidden {hidden} ({a.layers} layers; o_proj {entry['o_proj_mb']:.0f} MB fp32)")
        for phase, times in res["times"].items():
            base = times["replicated"]
            entry["phases"][phase] = {n: {"ms": t * 1e3, "vs_replicated": t / base} for n, t in times.items()}
            print(f"  {phase} (tokens per rank {PHASES[phase]}):")
            for n, t in times.items():
                path = res["paths"].get(f"{phase} {n}", "")
                print(f"    {n:<20}{t * 1e3:>9.2f} ms {t / base:>6.2f}x  {path}")
        if "slices by shape" in res["times"]["decode"] and "slices" in res["times"]["decode"]:
            for phase, times in res["times"].items():
                cost = times["slices"] - times["slices by shape"]
                entry["phases"][phase]["agreement_ms_per_forward"] = cost * 1e3
                print(f"  {phase}: the in-op agreement costs {cost * 1e3:.2f} ms per forward "
                      f"({cost / times['slices by shape']:+.0%} on the by-shape forward)")
        for n, mem in res["memory"].items():
            print(f"  {n}: saves {mem['saved_bytes'] / 2**20:.1f} of {mem['series_bytes'] / 2**20:.1f} MB"
                  + (f", decode_tokens={mem['decode_tokens']}" if mem["decode_tokens"] is not None else ""))
        report["sizes"][str(hidden)] = entry
    if rank != 0:
        return 0
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, a.out_name), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
