"""The cost of one collective inside a ``share_size`` block, per size: what ``ascend-compile plan``
takes as ``--measured-us``.

For each size ``K`` that divides the world (``--sizes``, default 2 4 8 16), every rank creates every
block's process group in the same order (as ``shard_model`` does), then times inside its block:

- ``latency``: an all-reduce of one int64 (the fixed cost of a collective);
- ``broadcast``: a broadcast of ``--bytes`` bytes from the block's rank 0 (a layer: bandwidth).

Each time is the median of ``--reps`` calls, each from a synchronised device to the end of its work
(``ascend_compile.runtime.timing``), the slowest rank's median. Rank 0 prints a table and the line
to paste into ``ascend-compile plan``.

On a device, one process per device, across machines for sizes above a machine:
``torchrun --nnodes 4 --nproc-per-node 8 ... benchmarks/collectives.py --device npu --backend hccl``.
On the CPU (gloo): ``torchrun --standalone --nproc-per-node 4 benchmarks/collectives.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def measure(sizes, nbytes: int, reps: int, device) -> list:
    """``[{"size", "latency_us", "broadcast_us", "gbps"}]`` for each size that divides the world."""
    import torch
    import torch.distributed as dist

    from ascend_compile.runtime import blocks, timing

    world, me = dist.get_world_size(), dist.get_rank()
    rows = []
    for size in sizes:
        if size < 2 or world % size:
            continue
        split = blocks.split(range(world), size)
        mine = None
        for ranks in split.members:  # every rank creates every block's group, in the same order
            g = dist.new_group(list(ranks), use_local_synchronization=True)
            if me in ranks:
                mine = g
        one = torch.ones(1, dtype=torch.int64, device=device)
        layer = torch.empty(max(nbytes // 2, 1), dtype=torch.bfloat16 if device.type != "cpu" else torch.float16,
                            device=device)
        latency = timing.time_call(lambda: dist.all_reduce(one, group=mine), device, reps=reps, warmup=2)
        src = split.members[split.index_of(me)][0]
        bcast = timing.time_call(lambda: dist.broadcast(layer, src=src, group=mine), device, reps=reps, warmup=1)
        slowest = torch.tensor([latency, bcast], dtype=torch.float32, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the slowest rank's, over the world
        latency, bcast = slowest.tolist()
        rows.append({"size": size, "latency_us": latency * 1e6, "broadcast_us": bcast * 1e6,
                     "gbps": layer.numel() * layer.element_size() / bcast / 1e9})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--bytes", type=int, default=16 << 20, help="bytes of the timed broadcast (default 16 MiB)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cpu", help="the device type of each rank (npu, cuda)")
    p.add_argument("--backend", default=None, help="the process group's backend (hccl, nccl; gloo on the CPU)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here (rank 0)")
    a = p.parse_args(argv)
    if "RANK" not in os.environ:
        print("start under torchrun, one process per device: torchrun --nproc-per-node N benchmarks/collectives.py",
              file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    device = torch.device(a.device if a.device == "cpu" else f"{a.device}:{int(os.environ.get('LOCAL_RANK', rank))}")
    if device.type != "cpu":
        getattr(torch, device.type).set_device(device)
    dist.init_process_group(a.backend or ("gloo" if a.device == "cpu" else None))
    try:
        rows = measure(a.sizes, a.bytes, a.reps, device)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(f"per-collective cost inside a block, {os.environ['WORLD_SIZE']} ranks on {a.device} "
              f"(slowest rank's median of {a.reps})")
        print(f"  {'share_size':>10}  {'all-reduce 1 int':>16}  {'broadcast':>12}  {'GB/s':>7}")
        for r in rows:
            print(f"  {r['size']:>10}  {r['latency_us']:13.1f} us  {r['broadcast_us']:9.1f} us  {r['gbps']:7.2f}")
        print("ascend-compile plan --measured-us " + " ".join(f"{r['size']}={r['latency_us']:.0f}" for r in rows))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
