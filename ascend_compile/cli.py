"""``ascend-compile``: run the demo, explain a dump, plan at NPU scale."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def _demo(ns) -> int:
    from . import demo

    args = demo.DemoArgs(
        ranks=ns.ranks, layers=ns.layers, hidden=ns.hidden, series=tuple(ns.series), prefetch_step=ns.prefetch_step,
        lowering=ns.lowering, dtype=ns.dtype, tokens=ns.tokens, dump_dir=ns.dump_dir or "", layout=ns.layout,
        decode_tokens=ns.decode_tokens,
    )
    text, ok = demo.report(*demo.run(args))
    print(text)
    return 0 if ok else 1


def _explain(ns) -> int:
    from .debug.dump import format_schedule, schedule_problems

    paths = sorted(glob.glob(os.path.join(ns.dump_dir, "rank_*", "schedule.json")))
    every = sorted(glob.glob(os.path.join(ns.dump_dir, "rank_*", "graph_*", "schedule.json")))
    if ns.all_graphs:
        paths = every
    ops = sorted(glob.glob(os.path.join(ns.dump_dir, "rank_*", "attention_ops.json")))
    for p in ops:  # shared layers read inside ops the graphs cannot see (vLLM-Ascend's MLA)
        with open(p) as f:
            table = json.load(f)
        print(f"== {os.path.relpath(p, ns.dump_dir)}: {len(table['ops'])} op(s) read shared layers inside "
              f"(fetched where each starts; prefetch_step {table['prefetch_step']})")
        for row in table["ops"]:
            print(f"  {row['op']}: reads {', '.join(row['reads'])}; fetched {row['fetched']}")
        print()
    if ops and not paths:
        return 0
    if not paths:
        print(f"no rank_*/schedule.json under {ns.dump_dir!r}: compile with options={{'dump_dir': ...}} "
              "or ASCEND_COMPILE_DUMP=dir first", file=sys.stderr)
        return 2
    for p in paths:
        with open(p) as f:
            table = json.load(f)
        print(f"== {os.path.relpath(p, ns.dump_dir)}")
        print(format_schedule(table))
        print()
    tables = {}
    for p in every or paths:  # the cross-checks look at every graph of every rank
        with open(p) as f:
            tables[os.path.relpath(os.path.dirname(p), ns.dump_dir)] = json.load(f)
    problems = schedule_problems(tables)
    for line in problems:
        print(f"PROBLEM: {line}")
    if not problems:
        print(f"checked {len(tables)} graph(s): the same collective order on every rank, "
              "every broadcast issued before its use")
    return 1 if problems else 0


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def _plan(ns) -> int:
    """Memory saved per device and the prefetch step the cost model would pick, at NPU scale."""
    from .passes.cost_model import CostInputs, StepInputs, choose_prefetch_step

    if ns.device:
        preset = DEVICES[ns.device]
        ns.ranks = ns.ranks or preset["ranks"]
        ns.bandwidth_gbps = ns.bandwidth_gbps or preset["bandwidth_gbps"]
    ns.ranks = ns.ranks or 8
    ns.bandwidth_gbps = ns.bandwidth_gbps or 56.0
    series, dims = {}, []
    for spec in ns.series:
        try:
            name, shape = spec.split("=")
            rows, cols = (int(v) for v in shape.lower().split("x"))
            dims.append((name, rows, cols))
        except ValueError:
            print(f"bad --series {spec!r}: use NAME=INxOUT, e.g. o_proj=16384x7168", file=sys.stderr)
            return 2
        nbytes = rows * cols * DTYPE_BYTES[ns.dtype]
        if ns.dtype == "int8":
            nbytes += cols * 4  # one fp32 scale per output channel
        series[name] = nbytes
    layer_bytes = sum(series.values())
    k_ranks = ns.ranks
    gib = 1 / 2**30
    print(f"{ns.layers} layers, {k_ranks} devices sharing, {ns.dtype}")
    for name, b in series.items():
        total = b * ns.layers
        print(f"  {name:<10} {b / 2**20:8.1f} MiB/layer  {total * gib:7.2f} GiB replicated  "
              f"saved per device {total * (k_ranks - 1) / k_ranks * gib:7.2f} GiB")
    total = layer_bytes * ns.layers
    print(f"  all series {layer_bytes / 2**20:8.1f} MiB/layer  {total * gib:7.2f} GiB replicated  "
          f"saved per device {total * (k_ranks - 1) / k_ranks * gib:7.2f} GiB "
          f"(owned per device: {total / k_ranks * gib:.2f} GiB)")
    compute_s = ns.compute_us * 1e-6 if ns.compute_us else 2 * ns.tokens * ns.params_per_layer / (ns.tflops * 1e12)
    inputs = CostInputs(
        layers=ns.layers, layer_bytes=layer_bytes, buffer_bytes=layer_bytes, bandwidth=ns.bandwidth_gbps * 1e9,
        compute_s=compute_s, latency_s=ns.latency_us * 1e-6,
        memory_budget=int(ns.memory_budget_gib * 2**30) if ns.memory_budget_gib else None,
        wrap_windows=ns.wrap_around,
    )
    choice = choose_prefetch_step(inputs)
    print(f"compute per layer: {compute_s * 1e6:.0f} us"
          + ("" if ns.compute_us else f" (2 x {ns.tokens} tokens x {ns.params_per_layer:.3g} params / {ns.tflops} TFLOPS)"))
    print(f"prefetch_step: {choice.explanation}")
    buffers = inputs.buffers(choice.k) * layer_bytes
    print(f"layer buffers alive: {buffers / 2**20:.1f} MiB per device at the peak of a step"
          + (f", {ns.wrap_around * layer_bytes / 2**20:.1f} MiB of them held between steps (wrap-around)"
             if ns.wrap_around else "")
          + f" (net saving {(total * (k_ranks - 1) / k_ranks - buffers) * gib:.2f} GiB)")
    step = StepInputs(
        series=tuple(dims), bytes_per_element=DTYPE_BYTES[ns.dtype], layers=ns.layers, ranks=k_ranks,
        link_bandwidth=ns.bandwidth_gbps * 1e9, memory_bandwidth=ns.memory_gbps * 1e9, flops_per_s=ns.tflops * 1e12,
        latency_s=ns.latency_us * 1e-6, params_per_layer=ns.params_per_layer,
    )
    k = choice.k
    print(f"\nstep estimates (modelled, not measured): {k_ranks} devices, {ns.bandwidth_gbps:g} GB/s a link (full mesh), "
          f"{ns.memory_gbps:g} GB/s memory, {ns.tflops:g} TFLOPS, {ns.latency_us:g} us per collective, prefetch_step={k}")
    print(f"  {'tokens/rank':>11}  {'replicated':>11}  {'layers':>17}  {'slices: decode':>17}  {'slices: gather':>17}")
    for tokens in sorted({ns.decode_tokens, ns.tokens}):
        t = step.steps(tokens, k, ns.wrap_around)
        base = t["replicated"]

        def cell(name):
            return f"{t[name] * 1e3:8.2f} ms {t[name] / base:5.2f}x"

        print(f"  {tokens:>11}  {base * 1e3:8.2f} ms  {cell('layers')}  {cell('slices decode')}  {cell('slices gather')}")
    print(f"  layout='slices' computes on the slices up to {step.decode_threshold(k)} tokens per rank (decode_tokens); "
          "both layouts save the same memory")
    return _compare_sizes(ns, step, k)


ANCHOR = ("vLLM-Ascend fine-grained TP of o_proj alone (published, measured; DeepSeek-R1 W8A8, DP32 on 32 Atlas A2): "
          "oproj_tensor_parallel_size=8 saves 5.8 GB per NPU at +1.5 ms TPOT; size 4: no TPOT increase reported")


def _compare_sizes(ns, step, k: int) -> int:
    """share_size for a deployment: memory saved and modelled step times per size and layout."""
    from .passes.cost_model import Deployment, compare_share_sizes, recommend

    measured = []
    for spec in ns.measured_us or []:
        try:
            size, us = spec.split("=")
            measured.append((int(size), float(us) * 1e-6))
        except ValueError:
            print(f"bad --measured-us {spec!r}: use SIZE=MICROSECONDS, e.g. 8=35", file=sys.stderr)
            return 2
    where = Deployment(ns.machines, ns.devices_per_machine, ns.hccs_gbps * 1e9, ns.roce_gbps * 1e9,
                       ns.latency_us * 1e-6, ns.roce_latency_us * 1e-6, tuple(measured))
    rows = compare_share_sizes(step, where, ns.sizes, ns.decode_tokens, ns.tokens, k)
    skipped = [s for s in ns.sizes if s not in {r["size"] for r in rows}]
    print(f"\nshare_size for {ns.machines} machine(s) x {ns.devices_per_machine} devices (a data-parallel group of "
          f"{where.devices}): HCCS {ns.hccs_gbps:g} GB/s within a machine, RoCE {ns.roce_gbps:g} GB/s between machines; "
          f"{ns.decode_tokens} tokens per rank at decode, {ns.tokens} at prefill; step times modelled"
          + (f"; per-collective latency measured for share_size {sorted(s for s, _ in measured)}" if measured else ""))
    print(f"  {'share_size':>10}  {'layout':<7} {'link':<5} {'latency':<9} {'saved/device':>12}  "
          f"{'decode step':>18}  {'prefill step':>18}")
    for r in rows:
        print(f"  {r['size']:>10}  {r['layout']:<7} {r['link']:<5} {r['latency']:<9} {r['saved'] / 2**30:8.2f} GiB  "
              f"{r['decode_s'] * 1e3:8.2f} ms {r['decode_s'] / r['replicated_decode_s']:6.2f}x  "
              f"{r['prefill_s'] * 1e3:8.2f} ms {r['prefill_s'] / r['replicated_prefill_s']:6.2f}x")
    if skipped:
        print(f"  left out: share_size {skipped} (does not divide {where.devices} devices)")
    goal = ns.memory_goal_gib * 2**30 if ns.memory_goal_gib is not None else None
    best, why = recommend(rows, goal)
    print(f"recommended: {why}")
    print(f"anchor: {ANCHOR}")
    return 0 if best is not None or goal is None else 1


DEVICES = {  # sharing group presets for ``plan``
    "a2": {"ranks": 8, "bandwidth_gbps": 56.0},  # Atlas A2 (910B) node: 8 devices, HCCS full mesh
    "a3": {"ranks": 16, "bandwidth_gbps": 196.0},  # Atlas A3 supernode slice: 16 devices
}


def main(argv=None) -> int:
    from .config import LOWERINGS
    from .demo import DTYPES

    parser = argparse.ArgumentParser(prog="ascend-compile", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="shard + compile a DeepSeek-shaped stack on CPU ranks and check it")
    d.add_argument("--ranks", type=int, default=2)
    d.add_argument("--layers", type=int, default=8)
    d.add_argument("--hidden", type=int, default=512, help="model width (DeepSeek proportions; multiple of 8)")
    d.add_argument("--series", nargs="+", default=["o_proj", "q_b_proj"])
    d.add_argument("--prefetch-step", type=int, default=1)
    d.add_argument("--lowering", choices=[x for x in LOWERINGS if x != "torchair"], default="inductor")
    d.add_argument("--dtype", choices=DTYPES, default="float32")
    d.add_argument("--tokens", type=int, default=16)
    d.add_argument("--dump-dir", default=None, help="where to write the graph dumps (default: a temp dir)")
    d.add_argument("--layout", choices=["layers", "slices"], default="layers")
    d.add_argument("--decode-tokens", type=int, default=8, help="--layout slices: the most tokens computed on slices")
    d.set_defaults(fn=_demo)

    e = sub.add_parser("explain", help="print the collective schedule of a dump directory and flag what looks "
                                       "wrong (orders that differ between ranks, broadcasts issued after their use); "
                                       "exits 1 on a problem")
    e.add_argument("dump_dir")
    e.add_argument("--all-graphs", action="store_true", help="every compiled graph, not only the latest")
    e.set_defaults(fn=_explain)

    p = sub.add_parser("plan", help="memory saved and the prefetch step the cost model picks, at NPU scale")
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--series", nargs="+", default=["o_proj=16384x7168", "q_b_proj=1536x24576"],
                   help="NAME=INxOUT per series (default: DeepSeek-V3)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--device", choices=sorted(DEVICES), default=None,
                   help="preset for --ranks and --bandwidth-gbps: a2 = 8 devices at 56 GB/s, a3 = 16 at 196 GB/s")
    p.add_argument("--ranks", type=int, default=None, help="devices in the sharing group (K; default 8)")
    p.add_argument("--bandwidth-gbps", type=float, default=None, help="link bandwidth, GB/s (HCCS; default 56)")
    p.add_argument("--memory-gbps", type=float, default=1600.0, help="device memory bandwidth, GB/s (HBM)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per rank of a decode step, for the estimates")
    p.add_argument("--latency-us", type=float, default=20.0)
    p.add_argument("--compute-us", type=float, default=None, help="compute per decoder layer; else estimated")
    p.add_argument("--tokens", type=int, default=256, help="tokens per step, for the compute estimate")
    p.add_argument("--params-per-layer", type=float, default=37e9 / 61, help="active params per layer")
    p.add_argument("--tflops", type=float, default=120.0, help="achieved TFLOPS, for the compute estimate")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="memory allowed for the fetched layers' buffers")
    p.add_argument("--wrap-around", type=int, default=0,
                   help="layers per series sent during the previous step (default 0: the torchair lowering has none)")
    p.add_argument("--machines", type=int, default=4, help="machines the data-parallel group runs on (share_size table)")
    p.add_argument("--devices-per-machine", type=int, default=8, help="devices per machine (Atlas A2: 8)")
    p.add_argument("--hccs-gbps", type=float, default=56.0, help="link within a machine, GB/s")
    p.add_argument("--roce-gbps", type=float, default=25.0, help="link between machines, GB/s (200 Gb/s RoCE: 25)")
    p.add_argument("--roce-latency-us", type=float, default=50.0, help="latency per collective between machines")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16], help="share_size values to compare")
    p.add_argument("--memory-goal-gib", type=float, default=None,
                   help="recommend the fastest share_size that saves at least this much per device (exits 1 if none)")
    p.add_argument("--measured-us", nargs="+", default=None, metavar="SIZE=US",
                   help="per-collective latency measured on the devices for a share_size (docs/npu_runbook.md), "
                        "instead of the modelled --latency-us / --roce-latency-us")
    p.set_defaults(fn=_plan)

    ns = parser.parse_args(argv)
    return ns.fn(ns)


if __name__ == "__main__":
    sys.exit(main())
