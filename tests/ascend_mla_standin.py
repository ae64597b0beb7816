"""A CPU stand-in of vLLM-Ascend 0.23's MLA attention op, run through vLLM 0.23's engine (test harness,
not shipped).

vLLM-Ascend cannot run here and vLLM's CPU build refuses MLA, so the stand-in follows vLLM-Ascend
v0.23.0 call by call where it matters for shared layers (``vllm_ascend/ops/mla.py``,
``vllm_ascend/attention/mla_v1.py``):

- the attention module calls a custom op (``torch.ops.vllm.ascend_compile_standin_mla_forward``,
  registered with vLLM's ``direct_register_custom_op``, ``mutates_args=["output"]``, opaque to Dynamo)
  with its prefix; the op finds the module in ``forward_context.no_compile_layers[prefix]`` and
  takes ``attn_metadata[<prefix>.attn]``, or None in a profile run or an idle rank's dummy batch;
- the op runs ``impl.forward``; the impl (not a module) holds ``q_proj`` (the ``q_b_proj``),
  ``o_proj`` and ``kv_b_proj``;
- with no metadata it fills the output with zeros and calls no projection;
- otherwise it calls ``q_proj`` once per part of its batch, the decode tokens first, then the prefill
  tokens (two calls on a mixed batch, one on a decode-only or prefill-only batch), reads
  ``o_proj.weight`` (the prefetch hint), and calls ``o_proj`` once on every token.

The math between is DeepSeek-V2's plain attention (vLLM's ``DeepseekV2Attention`` with
``VLLM_MLA_DISABLE=1``), so tokens can be compared with the unshared model exactly.

    .venv-vllm/bin/python tests/ascend_mla_standin.py --dir DIR [--configs unshared,layers,slices]

runs each config on 2 ranks (vLLM's external launcher, ``data_parallel_size=2``, a token
budget of 8 per step so prompts are chunked and steps mix decode and prefill tokens), forked from the
driver with the environment torchrun gives its ranks (``tests/ranks.py``: ``run_configs``), and prints a
JSON summary: each rank's tokens, and how many forwards called ``q_proj`` twice, once or not at all.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_MLA_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for each rank (read as torch loads)

import torch  # noqa: E402

ARCH = "AscendMLAStandinForCausalLM"
# calls of the op on this rank by the number of q_proj calls in them: {0: no metadata (profile run, idle
# dummy batch), 1: one part (decode or prefill only), 2: a mixed batch}
CALLS: dict = {0: 0, 1: 0, 2: 0}


class StandinMLAImpl:
    """What ``AscendMLAImpl`` does with the layers (``mla_v1.py`` v0.23.0, ``forward``)."""

    def __init__(self, attn, q_proj, o_proj, kv_b_proj):
        self.attn_module = attn  # the math below is DeepseekV2Attention's, on its other layers
        self.q_proj, self.o_proj, self.kv_b_proj = q_proj, o_proj, kv_b_proj

    def forward(self, layer_name: str, positions, hidden_states, attn_metadata, output):
        if attn_metadata is None:  # profile run / idle dummy batch
            CALLS[0] += 1
            return output.fill_(0)
        a = self.attn_module
        q_c = a.q_a_layernorm(a.q_a_proj(hidden_states)[0])
        latent_cache = a.kv_a_proj_with_mqa(hidden_states)[0]
        n = hidden_states.shape[0]
        decode = _decode_tokens(attn_metadata, n)
        parts = []
        if decode > 0:  # mla_preprocess_decode
            parts.append(self.q_proj(q_c[:decode])[0])
        if decode < n:  # mla_preprocess_prefill
            parts.append(self.q_proj(q_c[decode:])[0])
        CALLS[len(parts)] += 1
        q = (torch.cat(parts) if len(parts) > 1 else parts[0]).view(-1, a.num_local_heads, a.qk_head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        kv_a, _ = latent_cache.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent_cache = latent_cache.unsqueeze(1)
        kv = self.kv_b_proj(a.kv_a_layernorm(kv_a))[0]
        kv = kv.view(-1, a.num_local_heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k_pe = latent_cache[:, :, a.kv_lora_rank:]
        q_pe, k_pe = a.rotary_emb(positions, q_pe, k_pe)
        q[..., a.qk_nope_head_dim:] = q_pe
        k = torch.empty_like(q)
        k[..., :a.qk_nope_head_dim] = k_nope
        k[..., a.qk_nope_head_dim:] = k_pe
        v = torch.nn.functional.pad(v, [0, a.qk_head_dim - a.v_head_dim], value=0).view(
            -1, a.num_local_heads * a.qk_head_dim)
        attn_output = a.attn(q, k, v)
        attn_output = attn_output.view(-1, a.num_local_heads, a.qk_head_dim)[..., :a.v_head_dim].reshape(
            -1, a.num_local_heads * a.v_head_dim)
        self.o_proj.weight  # maybe_prefetch_mla_or_sla_weight_in_current_stream(inputs=self.o_proj.weight, ...)
        output.copy_(self.o_proj(attn_output)[0])
        return output


def _decode_tokens(meta, n: int) -> int:
    """Tokens of the leading one-token (decode) requests: vLLM-Ascend's ``num_decode_tokens`` (its
    builder reorders decodes first; vLLM's CPU backend fills the field only for its SDPA prefill)."""
    starts = meta.query_start_loc.tolist()
    decode = 0
    for begin, end in zip(starts, starts[1:]):
        if end - begin != 1:
            break
        decode = end
    return min(decode, n)


def standin_mla_forward(positions: torch.Tensor, hidden_states: torch.Tensor, output: torch.Tensor,
                        layer_name: str) -> None:
    """``vllm_ascend/ops/mla.py`` ``mla_forward``: the layer from the forward context, its metadata or None."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    self = ctx.no_compile_layers[layer_name]
    meta = ctx.attn_metadata
    if meta:
        meta = meta[self.attn.layer_name] if isinstance(meta, dict) else meta
    self.impl.forward(self.attn.layer_name, positions, hidden_states, meta, output)


def standin_mla_forward_fake(positions, hidden_states, output, layer_name) -> None:
    return None


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    if not hasattr(torch.ops.vllm, "ascend_compile_standin_mla_forward"):
        direct_register_custom_op(op_name="ascend_compile_standin_mla_forward", op_func=standin_mla_forward,
                                  mutates_args=["output"], fake_impl=standin_mla_forward_fake)


def model_class():
    """``AscendMLAStandinForCausalLM``: vLLM's DeepSeek-V2 whose attention runs in the stand-in op."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.models import deepseek_v2

    _register_op()

    class StandinMLAAttention(deepseek_v2.DeepseekV2Attention):
        """``AscendMultiHeadLatentAttention``: registers itself under its prefix, calls the op."""

        def __init__(self, *args, prefix: str = "", **kwargs):
            super().__init__(*args, prefix=prefix, **kwargs)
            self.prefix = prefix
            self.impl = StandinMLAImpl(self, q_proj=self.q_b_proj, o_proj=self.o_proj, kv_b_proj=self.kv_b_proj)
            context = get_current_vllm_config().compilation_config.static_forward_context
            if prefix in context:
                raise ValueError(f"Duplicate layer name: {prefix}")
            context[prefix] = self

        def forward(self, positions, hidden_states, llama_4_scaling=None):
            output = torch.empty((hidden_states.shape[0], self.hidden_size), dtype=hidden_states.dtype,
                                 device=hidden_states.device)
            torch.ops.vllm.ascend_compile_standin_mla_forward(positions, hidden_states, output, self.prefix)
            return output

    class AscendMLAStandinForCausalLM(deepseek_v2.DeepseekV2ForCausalLM):
        def __init__(self, *, vllm_config, prefix: str = ""):
            plain = deepseek_v2.DeepseekV2Attention
            deepseek_v2.DeepseekV2Attention = StandinMLAAttention  # the class its decoder layers build
            try:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            finally:
                deepseek_v2.DeepseekV2Attention = plain

    return AscendMLAStandinForCausalLM


CONFIGS = {
    "unshared": None,
    "layers": {"layers": ["q_b_proj", "o_proj"], "prefetch_step": 1},
    "slices": {"layers": ["q_b_proj", "o_proj"], "layout": "slices", "decode_tokens": 8},
    # the integration's fetch at the op's start switched off: what a model without it meets
    "layers-nofetch": {"layers": ["q_b_proj", "o_proj"], "prefetch_step": 1},
    "kv_b_proj": {"layers": ["kv_b_proj"]},  # read at load to build W_UK/W_UV: refused
    # compilation mode 3 (vLLM-Ascend's default): the graph split at the attention op, as vLLM-Ascend splits
    # it at vllm::mla_forward (tests/vllm_mode3.py keeps mode 3 on vLLM's CPU platform)
    "unshared-mode3": None,
    "layers-mode3": {"layers": ["q_b_proj", "o_proj"], "prefetch_step": 1},
    "slices-mode3": {"layers": ["q_b_proj", "o_proj"], "layout": "slices", "decode_tokens": 8},
}


def worker(args) -> int:
    from vllm import ModelRegistry

    import vllm_generate

    rank = int(os.environ["RANK"])
    ModelRegistry.register_model(ARCH, model_class())
    mode = 2
    if args.config.endswith("-mode3"):
        from vllm_mode3 import keep_mode_3

        keep_mode_3(splitting_ops=["vllm::ascend_compile_standin_mla_forward"])  # vLLM-Ascend: vllm::mla_forward
        mode = 3
    if args.config.endswith("-nofetch"):
        from ascend_compile.integrations.vllm import patches

        patches.fetch_in_attention_readers = lambda model, dump_dir=None: []
    path = vllm_generate.checkpoint_once("deepseek_v2", os.path.join(args.dir, "deepseek_v2_4"), 4, rank)
    # a budget of 8 tokens a step: prompts are chunked, so steps mix decodes and prefill chunks
    dump = os.path.join(args.dir, "dumps", args.config) if CONFIGS[args.config] else None
    # mode 2: our backend lowers with aot_eager (the op's readers are the subject, not the lowering; and faster)
    result = vllm_generate.generate(path, rank, CONFIGS[args.config], dump, mode=mode,
                                    lowering="aot_eager" if mode == 2 else None,
                                    llm_kwargs={"hf_overrides": {"architectures": [ARCH]},
                                                "max_num_batched_tokens": 8})
    result["q_proj_calls"] = {str(k): v for k, v in CALLS.items()}
    with open(os.path.join(args.dir, f"{args.config}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


def preload() -> None:
    """What every rank imports, imported once by the driver its ranks are forked from."""
    from ranks import preload_vllm

    preload_vllm("vllm.model_executor.models.deepseek_v2")


def main(argv=None) -> int:
    from ranks import configs_main

    return configs_main(__doc__, "unshared,layers,slices", worker, preload, argv)


if __name__ == "__main__":
    sys.exit(main())
