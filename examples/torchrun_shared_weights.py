"""Share `o_proj` and `q_b_proj` across the ranks of a torchrun job and compile with our backend.

    torchrun --nproc-per-node 2 examples/torchrun_shared_weights.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/torchrun_shared_weights.py --device npu --lowering torchair

Every rank builds the same model (same seed), shards it after the weights are in place,
compiles it with ``backend="ascend_compile"`` and checks the output against the unsharded
model. Rank 0 prints what it saved and where the dumps are. Exit code 0 only if every rank
matched. (The NPU line is not verified on hardware: see docs/npu_runbook.md.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prefetch-step", default="1", help="an int or 'auto'")
    p.add_argument("--lowering", default=None, help="inductor (default off NPU), aot_eager, eager, torchair")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dump-dir", default="dumps")
    args = p.parse_args(argv)
    step = args.prefetch_step if args.prefetch_step == "auto" else int(args.prefetch_step)

    if args.device == "npu":
        import torch_npu  # noqa: F401  (NPU machines only)

        torch.npu.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("hccl" if args.device == "npu" else "gloo")
    rank = dist.get_rank()
    device = torch.device(args.device)

    shape = StackShape(layers=args.layers)
    x = make_input(shape).to(device)
    options = {"dump_dir": args.dump_dir}
    if args.lowering:
        options["lowering"] = args.lowering
    with torch.no_grad():
        reference = torch.compile(build_stack(shape).to(device), backend="ascend_compile", options=options)(x)

        model = build_stack(shape).to(device)  # in a server: the loaded model
        plan = ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj", "q_b_proj"], prefetch_step=step))
        compiled = torch.compile(model, backend="ascend_compile", fullgraph=True, options=options)
        out = compiled(x)
    ac.drain_prefetch(model)  # wait for the next forward's windows (wrap-around) before the group goes away

    same = torch.equal(out, reference)
    diff = float((out.float() - reference.float()).abs().max())
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, (rank, same, diff, plan.saved_bytes()))
    if rank == 0:
        for r, eq, d, saved in results:
            print(f"rank {r}: saved {saved / 2**10:.1f} KiB of {plan.series_bytes() / 2**10:.1f} KiB shared; "
                  f"output {'bitwise equal to' if eq else f'max |diff| {d:.2e} from'} the unsharded model")
        print(f"schedule: ascend-compile explain {args.dump_dir}")
    ok = all(d <= 1e-5 for _, _, d, _ in results)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    # torch 2.10's gloo worker threads can still be releasing the last collective's tensors while
    # Python finalizes the interpreter; the process then aborts after its work is done
    # ("terminate called without an active exception", SIGABRT, about 1 run in 12 here). Leave
    # without finalizing, as multiprocessing's workers do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
