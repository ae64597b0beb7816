"""vLLM 0.23's engine in compilation mode 3 (VLLM_COMPILE, piecewise) on 2 DP ranks, without sharing,
with sliced layers and with whole layers, through a TEST HARNESS (never shipped) that keeps mode 3 on vLLM's CPU platform.

What vLLM 0.23's CPU build does to mode 3, and what the harness (``keep_mode_3``) undoes, each the
least that lets vLLM's own piecewise compile run here:

1. ``CpuPlatform.check_and_update_config`` turns mode 3 into mode 2 with plain Inductor on the whole
   graph (``vllm/platforms/cpu.py``). The harness puts mode 3 back, with ``backend="inductor"`` (the
   piece compiler vLLM's CPU platform names) and ``cudagraph_mode`` NONE, as the platform set it.
2. It leaves ``compile_sizes`` None, and ``PiecewiseBackend`` then finds no compiled range for any
   batch (``AssertionError: Shape: 2048 out of considered ranges: [(1, 2048)]``). The harness sets
   ``[]``, vLLM's own default elsewhere.
3. ``FixFunctionalizationPass`` compares each ``auto_functionalized`` target with CUDA-only ops
   (``torch.ops._C.fused_add_rms_norm_static_fp8_quant`` and four more) that the CPU build's ``_C``
   does not define: ``AttributeError`` on the first mutating op. The harness defines those names as
   placeholder schemas (never called) before the pass runs.

Run by ``tests/test_vllm_mode3.py``: ``python tests/vllm_mode3.py --dir DIR``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for each rank (read as torch loads)

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_ONLY = ("fused_add_rms_norm_static_fp8_quant", "rms_norm_dynamic_per_token_quant", "rms_norm_static_fp8_quant",
             "silu_and_mul_quant", "fused_qk_norm_rope")

CONFIGS = {
    "unshared": None,
    "slices": {"layers": ["o_proj", "down_proj"], "layout": "slices", "decode_tokens": 8},
    # whole layers, scheduled by our pass inside each piece (mode 3 defaults wrap_around to False)
    "layers": {"layers": ["o_proj", "down_proj"], "prefetch_step": 1},
    # our pass kept out of vLLM's pass manager: what a piece compiled without it meets
    "slices-nopass": {"layers": ["o_proj", "down_proj"], "layout": "slices", "decode_tokens": 8},
}


def keep_mode_3(splitting_ops=()) -> None:
    """TEST HARNESS ONLY: the three changes above, applied to vLLM's classes in this process; and
    ``splitting_ops`` added to vLLM's (as vLLM-Ascend adds its attention ops, ``vllm::mla_forward``)."""
    import torch
    from vllm.compilation.passes.utility import fix_functionalization
    from vllm.platforms import cpu

    platform_check = cpu.CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        cc = vllm_config.compilation_config
        wanted = cc.mode
        platform_check(cls, vllm_config)
        if wanted is not None and int(wanted) == 3:
            cc.mode, cc.backend = wanted, "inductor"
            if cc.compile_sizes is None:
                cc.compile_sizes = []
            if splitting_ops:
                cc.splitting_ops = list(cc.splitting_ops or []) + [op for op in splitting_ops
                                                                    if op not in (cc.splitting_ops or [])]

    cpu.CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    fix = fix_functionalization.FixFunctionalizationPass.__call__

    def call(self, graph):
        for name in CUDA_ONLY:
            if not hasattr(torch.ops._C, name):
                torch.library.define(f"_C::{name}", "(Tensor x) -> ()")
        return fix(self, graph)

    fix_functionalization.FixFunctionalizationPass.__call__ = call


def worker(args) -> int:
    import vllm_generate

    keep_mode_3()
    if args.config.endswith("-nopass"):
        from ascend_compile.integrations.vllm import pieces

        def caches_off_only(vllm_config, options=None):
            vllm_config.compilation_config.inductor_compile_config["force_disable_caches"] = True

        pieces.register = caches_off_only
    rank = int(os.environ["RANK"])
    path = vllm_generate.checkpoint_once("llama", os.path.join(args.dir, "llama_4"), 4, rank)
    shared = CONFIGS[args.config]
    dump = os.path.join(args.dir, "dumps", args.config) if shared else None
    result = vllm_generate.generate(path, rank, shared, dump, mode=3)

    with open(os.path.join(args.dir, f"{args.config}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


def preload() -> None:
    """What every rank imports, imported once by the driver its ranks are forked from."""
    from ranks import preload_vllm

    preload_vllm("vllm.model_executor.models.llama", "vllm.compilation.passes.utility")


def main(argv=None) -> int:
    from ranks import configs_main

    return configs_main(__doc__, ",".join(CONFIGS), worker, preload, argv)


if __name__ == "__main__":
    sys.exit(main())
