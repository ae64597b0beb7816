"""The demo: shard a DeepSeek-shaped stack over N CPU ranks, compile it, check it, report.

Every rank builds the same model (same seed), runs the unsharded model eagerly and
compiled, shards it, runs the sharded model eagerly and compiled with
``backend="ascend_compile"``, and compares. Rank 0 prints the memory saved per rank and
the collective schedule of its compiled graph.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class DemoArgs:
    ranks: int = 2
    layers: int = 8
    hidden: int = 512
    series: tuple = ("o_proj", "q_b_proj")
    prefetch_step: int = 1
    lowering: str = "inductor"
    dtype: str = "float32"
    tokens: int = 16
    dump_dir: str = ""
    layout: str = "layers"
    decode_tokens: int = 8  # layout="slices": the threshold (the demo also runs a decode forward of 2 and 1 tokens)


def _rank_main(rank: int, world_size: int, args: DemoArgs) -> dict:
    import torch

    import ascend_compile as ac
    from ascend_compile.models import StackShape, build_stack, make_input

    dtype = getattr(torch, args.dtype)
    shape = StackShape.scaled(args.layers, args.hidden)
    x = make_input(shape, args.tokens, dtype=dtype)
    reference = build_stack(shape, dtype=dtype)
    with torch.no_grad():
        ref_eager = reference(x)
        ref_compiled = torch.compile(reference, backend=args.lowering)(x) if args.lowering != "torchair" else ref_eager
    del reference

    model = build_stack(shape, dtype=dtype)
    before = ac.parameter_storage_bytes(model)
    sliced = args.layout == "slices"
    config = (ac.SharedWeightConfig(layers=list(args.series), prefetch_step=args.prefetch_step, layout="slices",
                                    decode_tokens=args.decode_tokens) if sliced
              else ac.SharedWeightConfig(layers=list(args.series), prefetch_step=args.prefetch_step))
    plan = ac.shard_model(model, config)
    after = ac.parameter_storage_bytes(model)
    with torch.no_grad():
        eager = model(x)
        fn = torch.compile(
            model, backend="ascend_compile", fullgraph=True,
            options={"lowering": args.lowering, "dump_dir": args.dump_dir},
        )
        # 3 forwards: the first fetches its first layers at entry, the next ones take them from the
        # windows the forward before sent during its last layers (wrap-around)
        steps = [fn(x) for _ in range(3)]
        decode_diff = None
        if sliced:  # a decode forward: 2 tokens on rank 0, 1 on the others (an idle rank's dummy), on the slices
            small = make_input(shape, 2 if rank == 0 else 1, seed=5, dtype=dtype)
            want = torch.compile(build_stack(shape, dtype=dtype), backend=args.lowering)(small)
            decode_diff = float((fn(small).float() - want.float()).abs().max())
    in_flight = ac.drain_prefetch(model)  # the last forward sent the next one's windows: wait for them before exiting
    with open(os.path.join(args.dump_dir, f"rank_{rank}", "schedule.json")) as f:
        schedule = json.load(f)
    return {
        "rank": rank,
        "bytes_before": before,
        "bytes_after": after,
        "series_bytes": plan.series_bytes(),
        "planned_saving": plan.saved_bytes(),
        "eager_bitwise": bool(torch.equal(eager, ref_eager)),
        "eager_max_abs_diff": float((eager.float() - ref_eager.float()).abs().max()),
        "decode_max_abs_diff": decode_diff,
        "decode_tokens": plan.decode_tokens,
        "compiled_max_abs_diff": max(float((c.float() - ref_compiled.float()).abs().max()) for c in steps),
        "compiled_bitwise": all(bool(torch.equal(c, ref_compiled)) for c in steps),
        "window_bytes": plan.window_bytes(),
        "drained": in_flight,
        "schedule": schedule,
    }


def run(args: DemoArgs) -> tuple:
    """``(args, per-rank results)``; ``args.dump_dir`` is filled in with a temp dir if empty."""
    from .launch import spawn

    if not args.dump_dir:
        args = dataclasses.replace(args, dump_dir=tempfile.mkdtemp(prefix="ascend_compile_demo_"))
    return args, spawn(_rank_main, args.ranks, args)


def tolerance(dtype: str) -> float:
    return {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}[dtype]


def report(args: DemoArgs, results: list) -> tuple:
    """The demo's printout and whether every check passed."""
    from .debug.dump import format_schedule

    mib = 1 / 2**20
    ok = True
    lines = [
        f"ascend_compile demo: {args.layers}-layer DeepSeek-shaped stack (hidden {args.hidden}), series {list(args.series)}, "
        f"{args.ranks} ranks (gloo, CPU), lowering={args.lowering}, prefetch_step={args.prefetch_step}, {args.dtype}, "
        f"layout={args.layout}",
        "",
        f"{'rank':>4}  {'params before':>14}  {'params after':>13}  {'saved':>10}  {'of series':>9}  "
        f"{'eager == unsharded':>18}  {'compiled (3 forwards) vs unsharded':>34}",
    ]
    for r in results:
        saved = r["bytes_before"] - r["bytes_after"]
        match = "bitwise" if r["compiled_bitwise"] else f"max |diff| {r['compiled_max_abs_diff']:.2e}"
        eager = str(r["eager_bitwise"]) if r["eager_bitwise"] or args.layout == "layers" else \
            f"max |diff| {r['eager_max_abs_diff']:.1e}"
        lines.append(
            f"{r['rank']:>4}  {r['bytes_before'] * mib:>10.3f} MiB  {r['bytes_after'] * mib:>9.3f} MiB  "
            f"{saved * mib:>6.3f} MiB  {saved / r['series_bytes']:>8.1%}  {eager:>18}  {match:>34}"
        )
        if args.layout == "slices":  # computed on slices or on a transposed weight: equal within the tolerance
            ok &= r["eager_max_abs_diff"] <= tolerance(args.dtype) and r["decode_max_abs_diff"] <= tolerance(args.dtype)
        else:
            ok &= r["eager_bitwise"]
        ok &= r["compiled_max_abs_diff"] <= tolerance(args.dtype)
    k = args.ranks
    if args.layout == "slices":
        lines += ["", f"decode forward (2 tokens on rank 0, 1 on the others; computed on the slices, at most "
                      f"{results[0]['decode_tokens']} tokens): max |diff| vs unsharded "
                      + ", ".join(f"rank {r['rank']} {r['decode_max_abs_diff']:.2e}" for r in results)]
    lines += ["", f"expected saving per rank ~ series bytes x (K-1)/K = {(k - 1) / k:.1%} of "
                  f"{results[0]['series_bytes'] * mib:.3f} MiB",
              (f"wrap-around: the first layers of each series are sent during the previous forward's last layers; "
               f"windows held between forwards: {results[0]['window_bytes'] * mib:.3f} MiB per rank "
               f"({len(results[0]['drained'])} in flight after the last forward, waited for by ac.drain_prefetch)"
               if args.layout == "layers" else
               "slices: every rank keeps 1/K of every layer; forwards of at most decode_tokens tokens (the most of "
               "any rank) compute on the slices and move activations, larger ones gather each layer ahead"), "",
              "collective schedule of rank 0's compiled graph (positions are node indices):",
              format_schedule(results[0]["schedule"]), "", f"dumps: {args.dump_dir}",
              "result: " + ("OK - sharded model matches the unsharded model" if ok else "FAILED")]
    return "\n".join(lines), ok
