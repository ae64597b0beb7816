"""vLLM's own ``DeepseekV2ForCausalLM`` on CPU: a tiny checkpoint, vLLM's loader, a prefill forward.

What it takes to run a real vLLM model class on a CPU machine with the PyPI wheel of vLLM
(built for CUDA, its compiled ``_C`` kernels unusable here):

- ``VLLM_TARGET_DEVICE=cpu`` in the environment before vLLM is imported (vLLM's own switch),
  so the platform is ``CpuPlatform`` and MLA attention runs on its ``CPU_MLA`` backend, whose
  prefill is plain PyTorch (SDPA). Without it vLLM finds no platform and fails building the
  attention layer (``Invalid attention backend for None``).
- ``compilation_config.custom_ops=["none"]``: every vLLM custom op takes its PyTorch
  ``forward_native`` path (the CPU paths call ``torch.ops._C`` kernels, e.g. rotary embedding).
- ``kv_lora_rank + qk_rope_head_dim = 576``, the only latent size ``CPU_MLA`` supports.
- Prefill only: decode calls ``torch.ops._C.mla_decode_kvcache``, which this wheel lacks.

The checkpoint is written by ``transformers`` (a random ``DeepseekV2ForCausalLM``, every layer
different), so vLLM's ``DefaultModelLoader`` reads real safetensors through the model's own
``load_weights`` (stacked ``fused_qkv_a_proj`` / ``gate_up_proj`` included).
"""

from __future__ import annotations

import torch

LAYERS, TOKENS = 4, 8
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=16,
    # dense MLP in every layer: no MoE (its CPU kernels are compiled ones)
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=LAYERS,
    max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1,
)


def write_checkpoint(path: str, seed: int = 0) -> str:
    """A random tiny DeepSeek-V2 checkpoint (config.json + model.safetensors) in ``path``."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**TINY, torch_dtype="float32"))
    with torch.no_grad():  # larger than the 0.02 init, so every layer's weights matter to the output
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


def vllm_config(path: str, additional=None, mode: int = 0, backend: str = "", load_format: str = "safetensors",
                debug_dump_path=None):
    from vllm.config import CacheConfig, CompilationConfig, DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    return VllmConfig(
        model_config=ModelConfig(model=path, skip_tokenizer_init=True, dtype="float32", max_model_len=256, seed=0),
        device_config=DeviceConfig(device="cpu"),
        load_config=LoadConfig(load_format=load_format),
        cache_config=CacheConfig(block_size=16),
        compilation_config=CompilationConfig(mode=mode, backend=backend, custom_ops=["none"],
                                             debug_dump_path=debug_dump_path),
        additional_config=additional or {},
    )


def init_parallel(rank: int, world: int, config) -> None:
    """vLLM's parallel state on the process group the test pool made (once per process)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    with set_current_vllm_config(config):
        if not ps.model_parallel_is_initialized():
            ps.init_distributed_environment(world_size=world, rank=rank, local_rank=rank,
                                            distributed_init_method=None, backend="gloo")
            ps.initialize_model_parallel(1, 1)


class Prefill:
    """A model loaded by vLLM and what one prefill of ``TOKENS`` tokens needs: metadata, KV cache."""

    def __init__(self, config):
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader import get_model
        from vllm.v1.attention.backend import CommonAttentionMetadata

        self.config = config
        with set_current_vllm_config(config):
            self.model = get_model(vllm_config=config).eval()
            layers = dict(config.compilation_config.static_forward_context)
            first = next(iter(layers.values()))
            spec = first.get_kv_cache_spec(config)
            builder = first.get_attn_backend().get_builder_cls()(spec, list(layers), config, torch.device("cpu"))
            qsl = torch.tensor([0, TOKENS], dtype=torch.int32)
            seq_lens = torch.tensor([TOKENS], dtype=torch.int32)
            self.slots = torch.arange(TOKENS, dtype=torch.int64)
            common = CommonAttentionMetadata(
                query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq_lens, num_reqs=1,
                num_actual_tokens=TOKENS, max_query_len=TOKENS, max_seq_len=TOKENS,
                block_table_tensor=torch.arange(1, dtype=torch.int32)[None], slot_mapping=self.slots,
                causal=True, seq_lens_cpu_upper_bound=seq_lens.clone(), positions=torch.arange(TOKENS))
            metadata = builder.build(common_prefix_len=0, common_attn_metadata=common)
            self.metadata = {name: metadata for name in layers}
            self.layers = layers
            self.kv_shape = (1, spec.num_kv_heads, spec.block_size, spec.head_size)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        from vllm.config import set_current_vllm_config
        from vllm.forward_context import set_forward_context

        for layer in self.layers.values():  # a fresh cache: every call is the same prefill
            layer.bind_kv_cache(torch.zeros(self.kv_shape))
        with torch.no_grad(), set_current_vllm_config(self.config), set_forward_context(
                self.metadata, self.config, num_tokens=TOKENS, slot_mapping={n: self.slots for n in self.layers}):
            return self.model(input_ids, torch.arange(TOKENS))


def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (TOKENS,), generator=torch.Generator().manual_seed(1))
