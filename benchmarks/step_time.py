"""Step time on 2 CPU ranks (gloo): replicated = 1.00 vs shared weights and the alternatives.

Configurations, all on the same DeepSeek-shaped stack and input, timed in the same processes,
interleaved round by round (the machines are noisy; only ratios within one run are reported):

- ``replicated``          unsharded model, Inductor (the baseline, 1.00)
- ``shared k=0/1/2/auto`` ``backend="ascend_compile"`` (Inductor lowering), wrap-around on (the
                          default: the first k layers of a forward travel during the last k of
                          the one before)
- ``shared k=1/2 no wrap`` the same with ``wrap_around=False``: the first k broadcasts of every
                          forward are issued at its entry (what wrap-around gains)
- ``shared k=1 unpinned``  the same without the control_deps that pin the order (what pinning costs)
- ``replicated eager``    unsharded model, eager (baseline of the eager rows)
- ``eager hooks k=1``     the reference design: forward pre-hooks, async broadcasts 1 ahead
- ``FSDP2 prefetch``      ``fully_shard`` on every series layer (+ the root, which FSDP2 needs),
                          forward prefetch 1 ahead (eager)
- ``comm only``           the same broadcasts with no compute: the time there is to hide
- ``replicated + comm``   the replicated model with the same broadcasts running beside it: the
                          best any overlapping schedule can do on this machine, where gloo
                          moves the bytes with CPU threads that compete with compute

Hidden broadcast time of a shared config = ``1 - (t_shared - t_replicated) / t_comm_only``:
the share of the transfer time that did not show up in the step time.

Two regimes: ``compute`` (many tokens: a layer's compute outlasts its transfer) and ``comm``
(few tokens: the transfer outlasts the compute).

Run: ``python benchmarks/step_time.py``; writes ``benchmarks/results/step_time.json`` and
``step_time.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REGIMES = {
    "compute": {"tokens": 256, "layers": 8, "hidden": 512},
    "comm": {"tokens": 2, "layers": 8, "hidden": 512},
}
SERIES = ["o_proj", "q_b_proj"]


def _shape(r):
    from ascend_compile.models import StackShape

    return StackShape.scaled(r["layers"], r["hidden"])


def broadcasts_alone(model, series, world):
    """A step of the shared series' broadcasts (every layer's weights, owner ``i % world``) with
    no compute: the time a schedule has to hide. ``.buffers`` holds what it sends."""
    import torch.distributed as dist

    bufs = [p.detach().clone() for n, p in model.named_parameters() if any(n.endswith(s + ".weight") for s in series)]

    def comm_only(_x):
        works = [dist.broadcast(b, group_src=i % world, async_op=True) for i, b in enumerate(bufs)]
        for w in works:
            w.wait()

    comm_only.buffers = bufs
    return comm_only


def _rank(rank, world, regime, rounds, steps):
    import torch
    import torch.distributed as dist

    import ascend_compile as ac
    from ascend_compile.models import build_stack, make_input
    from eager_hooks import EagerHookSharing  # benchmarks/: the reference design's baseline
    from timing import median_seconds

    torch._dynamo.config.recompile_limit = 64  # one process compiles every configuration of the same model class
    r = REGIMES[regime]
    shape = _shape(r)
    x = make_input(shape, r["tokens"])
    configs = {}
    configs["replicated"] = torch.compile(build_stack(shape), backend="inductor")
    explain = {}
    for k in steps:
        m = build_stack(shape)
        ac.shard_model(m, ac.SharedWeightConfig(layers=SERIES, prefetch_step=k))
        d = f"/tmp/ascend_compile_bench_{regime}_{k}"
        configs[f"shared k={k}"] = torch.compile(m, backend="ascend_compile", options={"dump_dir": d})
        configs[f"shared k={k}"](x)
        with open(os.path.join(d, f"rank_{rank}", "schedule.json")) as f:
            table = json.load(f)
        explain[f"shared k={k}"] = {"prefetch_step": table["prefetch_step"], "explain": table.get("explain")}
    for k in (1, 2):
        m = build_stack(shape)
        ac.shard_model(m, ac.SharedWeightConfig(layers=SERIES, prefetch_step=k, wrap_around=False))
        configs[f"shared k={k} no wrap"] = torch.compile(m, backend="ascend_compile")
    m = build_stack(shape)
    ac.shard_model(m, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1))
    configs["shared k=1 unpinned"] = torch.compile(m, backend="ascend_compile", options={"pin_order": False})
    configs["replicated eager"] = build_stack(shape)
    m = build_stack(shape)
    EagerHookSharing(m, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1))
    configs["eager hooks k=1"] = m
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        m = build_stack(shape)
        mesh = init_device_mesh("cpu", (world,))
        for name in SERIES:
            mods = [mod for n, mod in m.named_modules() if n.endswith(name)]
            for mod in mods:
                fully_shard(mod, mesh=mesh)
            for a, b in zip(mods, mods[1:]):
                a.set_modules_to_forward_prefetch([b])
        fully_shard(m, mesh=mesh)  # FSDP2 needs a root; it also shards (and gathers) the rest of the model
        configs["FSDP2 prefetch"] = m
    except Exception as e:  # report, do not hide
        explain["FSDP2 prefetch"] = f"did not run: {type(e).__name__}: {e}"

    configs["comm only"] = comm_only = broadcasts_alone(build_stack(shape), SERIES, world)
    bufs = comm_only.buffers
    replicated = configs["replicated"]

    def replicated_with_comm(x_):
        # the same transfers running beside the replicated model: what overlap costs on this
        # machine when the link is served by CPU threads (gloo), whatever the schedule
        works = [dist.broadcast(b, group_src=i % world, async_op=True) for i, b in enumerate(bufs)]
        out = replicated(x_)
        for w in works:
            w.wait()
        return out

    configs["replicated + comm"] = replicated_with_comm

    with torch.no_grad():
        for fn in configs.values():  # compile and warm up
            fn(x)
            fn(x)
        median_s = median_seconds(configs, x, rounds)
    return {"median_s": median_s, "explain": explain}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--regimes", nargs="+", default=list(REGIMES))
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ascend_compile.launch import spawn

    steps = [0, 1, 2, "auto"]
    report = {"machine": f"{os.cpu_count()} cores, 2 gloo ranks on 127.0.0.1, 1 compute thread per rank", "regimes": {}}
    for regime in a.regimes:
        res = spawn(_rank, 2, regime, a.rounds, steps, timeout=3600)[0]
        med = res["median_s"]
        base, base_eager, comm = med["replicated"], med["replicated eager"], med["comm only"]
        rows = []
        for name, t in med.items():
            eager = name in ("replicated eager", "eager hooks k=1", "FSDP2 prefetch")
            ref = base_eager if eager else base
            row = {"config": name, "ms": t * 1e3, "vs_replicated": t / base, "vs_own_baseline": t / ref}
            if name.startswith(("shared", "eager hooks", "FSDP2", "replicated + comm")):
                row["hidden"] = 1 - max(0.0, t - ref) / comm
            rows.append(row)
        best_fixed = min(med[f"shared k={k}"] for k in (0, 1, 2))
        chosen = res["explain"]["shared k=auto"]["prefetch_step"]
        report["regimes"][regime] = {
            "shape": REGIMES[regime], "rows": rows, "explain": res["explain"],
            "auto_vs_best_fixed": med["shared k=auto"] / best_fixed,
            "auto_chosen_k": chosen,
            "chosen_fixed_vs_best_fixed": med[f"shared k={chosen}"] / best_fixed if chosen in (0, 1, 2) else None,
            "contention": med["replicated + comm"] / base,
            "comm_vs_compute": comm / base,
            # what wrap-around saves per forward, in units of one decoder layer's broadcasts
            # (comm only / layers): about 1 per window when the compute hides the transfer
            "wrap_gain_layers": {k: (med[f"shared k={k} no wrap"] - med[f"shared k={k}"]) / (comm / REGIMES[regime]["layers"])
                                 for k in (1, 2)},
        }
        print(f"\n== regime {regime}: {REGIMES[regime]}; comm only / replicated step = {comm / base:.2f}")
        print(f"{'config':<18}{'ms/step':>9}{'vs repl.':>10}{'vs own base':>13}{'hidden':>8}")
        for row in rows:
            hidden = f"{row['hidden']:.0%}" if "hidden" in row else ""
            print(f"{row['config']:<18}{row['ms']:>9.2f}{row['vs_replicated']:>10.2f}{row['vs_own_baseline']:>13.2f}{hidden:>8}")
        reg = report["regimes"][regime]
        print(f"auto chose k={chosen}: its run {reg['auto_vs_best_fixed']:.3f} x the best fixed k; the fixed "
              f"k={chosen} run {reg['chosen_fixed_vs_best_fixed']:.3f} x the best")
        print(f"transfers beside the replicated model cost {reg['contention']:.2f} x replicated on this machine")
        print("wrap-around saved per forward: " + ", ".join(
            f"k={k}: {g:.2f} layer broadcasts" for k, g in reg["wrap_gain_layers"].items()))
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "step_time.json"), "w") as f:
        json.dump(report, f, indent=2)
    _plot(report, os.path.join(a.out_dir, "step_time.png"))
    return 0


def _plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install '.[plot]')")
        return
    regimes = list(report["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        rows = [r for r in report["regimes"][regime]["rows"] if r["config"] != "comm only"]
        ax.barh([r["config"] for r in rows], [r["vs_replicated"] for r in rows], color="#4a7fd4")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(f"{regime}-bound: step time / replicated (Inductor)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
