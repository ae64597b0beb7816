"""A DeepSeek-shaped decoder stack built from vLLM's own layers, for tests on CPU gloo ranks.

MLA-style projections (``q_a_proj`` ReplicatedLinear -> vLLM RMSNorm -> ``q_b_proj``
ColumnParallelLinear; ``kv_a_proj_with_mqa`` ReplicatedLinear -> ``kv_b_proj``), rotary
embedding from ``get_rope`` on the rope part, ``o_proj`` RowParallelLinear, a gated MLP with
``gate_up_proj`` MergedColumnParallelLinear and ``down_proj`` RowParallelLinear, and a
``qkv_proj`` QKVParallelLinear so every LinearBase flavour is in a series. Tensor parallel
size is 1: the ranks share weights, they do not split them.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, Q_LORA, KV_LORA, HEADS, HEAD_DIM, ROPE, INTER = 64, 32, 16, 4, 16, 8, 96


def setup_vllm(rank: int, world: int):
    """vLLM's config and model-parallel state on the process group the test pool made."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"))
    ctx = set_current_vllm_config(cfg)
    ctx.__enter__()
    init_model_parallel(rank, world)
    return cfg, ctx


def init_model_parallel(rank: int, world: int) -> None:
    """vLLM's model-parallel state (TP 1, PP 1) on the process group the test pool made, once per process;
    inside a vLLM config."""
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.init_distributed_environment(world_size=world, rank=rank, local_rank=rank,
                                        distributed_init_method=None, backend="gloo")
        ps.initialize_model_parallel(1, 1)


class Layer(nn.Module):
    def __init__(self, i: int):
        super().__init__()
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.linear import (
            ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
        )
        from vllm.model_executor.layers.rotary_embedding import get_rope

        p = f"layers.{i}"
        self.input_layernorm = RMSNorm(HIDDEN)
        self.q_a_proj = ReplicatedLinear(HIDDEN, Q_LORA, bias=False, prefix=f"{p}.q_a_proj")
        self.q_a_layernorm = RMSNorm(Q_LORA)
        self.q_b_proj = ColumnParallelLinear(Q_LORA, HEADS * HEAD_DIM, bias=False, prefix=f"{p}.q_b_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(HIDDEN, KV_LORA + ROPE, bias=False, prefix=f"{p}.kv_a")
        self.kv_b_proj = ColumnParallelLinear(KV_LORA, HEADS * HEAD_DIM, bias=False, prefix=f"{p}.kv_b_proj")
        self.rotary_emb = get_rope(ROPE, max_position=64, is_neox_style=False)
        self.qkv_proj = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, bias=True, prefix=f"{p}.qkv_proj")
        self.o_proj = RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, bias=False, prefix=f"{p}.o_proj")
        self.post_attention_layernorm = RMSNorm(HIDDEN)
        self.gate_up_proj = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, prefix=f"{p}.gate_up_proj")
        self.down_proj = RowParallelLinear(INTER, HIDDEN, bias=False, prefix=f"{p}.down_proj")

    def forward(self, positions, h):
        x = self.input_layernorm(h)
        q, _ = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)[0]))
        kv_a, _ = self.kv_a_proj_with_mqa(x)
        kv, k_pe = kv_a.split([KV_LORA, ROPE], dim=-1)
        k_pe, _ = self.rotary_emb(positions, k_pe.contiguous(), k_pe.contiguous())
        kv, _ = self.kv_b_proj(kv.contiguous())
        qkv, _ = self.qkv_proj(x)
        mix = q * torch.sigmoid(kv) + qkv[:, : HEADS * HEAD_DIM] * k_pe.sum(-1, keepdim=True)
        o, _ = self.o_proj(mix)
        h = h + o
        gate_up, _ = self.gate_up_proj(self.post_attention_layernorm(h))
        gate, up = gate_up.chunk(2, dim=-1)
        d, _ = self.down_proj(torch.nn.functional.silu(gate) * up)
        return h + d


class VllmStack(nn.Module):
    def __init__(self, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(Layer(i) for i in range(layers))

    def forward(self, positions, h):
        for layer in self.layers:
            h = layer(positions, h)
        return h


def build(layers: int = 4, seed: int = 0, processed: bool = True) -> VllmStack:
    """Built, filled and processed as vLLM's loader would, with the plain GEMM for every layer
    (vLLM CPU's oneDNN handles off), so that sharded and unsharded models run the same kernels.
    ``processed=False``: filled but not processed (as after vLLM's ``load_weights``)."""
    torch.manual_seed(seed)
    model = VllmStack(layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if p.dim() == 1 else noise / p.shape[-1] ** 0.5)
    if processed:
        process(model, onednn=False)
    return model.eval().requires_grad_(False)


def process(model: nn.Module, onednn: bool = True) -> None:
    """``process_weights_after_loading`` of every layer, as vLLM's loader runs it after loading.

    On vLLM's CPU platform this picks each linear layer's GEMM (``layer.cpu_linear``); with
    ``onednn=False`` the plain ``F.linear`` that reads the weight parameter."""
    from unittest import mock

    import vllm._custom_ops as ops

    with mock.patch.object(ops, "_supports_onednn", ops._supports_onednn and onednn):
        for module in model.modules():
            qm = getattr(module, "quant_method", None)
            if qm is not None:
                qm.process_weights_after_loading(module)


def inputs(tokens: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.arange(tokens), torch.randn(tokens, HIDDEN, generator=g)


def _quant_config(method):
    """A ``QuantizationConfig`` whose linear layers use ``method`` (a LinearMethodBase instance)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    class Config(QuantizationConfig):
        def get_name(self):
            return f"test_{type(method).__name__}"

        def get_supported_act_dtypes(self):
            return [torch.float32]

        @classmethod
        def get_min_capability(cls):
            return 0

        @staticmethod
        def get_config_filenames():
            return []

        @classmethod
        def from_config(cls, config):
            return cls()

        def get_quant_method(self, layer, prefix):
            return method if isinstance(layer, LinearBase) else None

    return Config()


def int8_config():
    """A minimal weight-only int8 ``QuantizationConfig``: weight (int8) + per-channel scale (fp32).

    ``process_weights_after_loading`` changes the layout (the weight is stored transposed for
    the kernel), as real quantization methods do, so sharding must see the processed params.
    """
    from torch.nn import Parameter
    from vllm.model_executor.layers.linear import LinearMethodBase

    class Int8WeightOnly(LinearMethodBase):
        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                           output_size, params_dtype, **extra):
            out = sum(output_partition_sizes)
            layer.register_parameter("weight", Parameter(
                torch.randint(-127, 127, (out, input_size_per_partition), dtype=torch.int8), requires_grad=False))
            layer.register_parameter("weight_scale", Parameter(torch.rand(out) / 64 + 1e-3, requires_grad=False))

        def process_weights_after_loading(self, layer):
            layer.weight = Parameter(layer.weight.data.t().contiguous(), requires_grad=False)  # [in, out]

        def apply(self, layer, x, bias=None):
            out = torch.mm(x, layer.weight.float()) * layer.weight_scale
            return out if bias is None else out + bias

    return _quant_config(Int8WeightOnly())


def packing_config(meta_reads_weight: bool = False):
    """Processing that moves the weight into a kernel handle and leaves an empty parameter, as
    vLLM's CPU oneDNN / SGL GEMM dispatch does (``dispatch_cpu_unquantized_gemm(remove_weight=True)``).
    With ``meta_reads_weight``, processing without values picks a GEMM that reads the weight
    parameter, as vLLM's does; without, it packs even then (a layer that cannot be shared)."""
    from torch.nn import Parameter
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    class Packing(UnquantizedLinearMethod):
        def process_weights_after_loading(self, layer):
            if layer.weight.is_meta and meta_reads_weight:  # vLLM CPU: a layer without values gets F.linear
                layer.cpu_linear = torch.nn.functional.linear
                return
            packed = layer.weight.data.clone()
            layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, packed, bias)
            layer.weight = Parameter(torch.empty(0), requires_grad=False)

        def apply(self, layer, x, bias=None):
            return layer.cpu_linear(x, layer.weight, bias)

    return _quant_config(Packing())


def raising_config(rank: int, message: str):
    """Unquantized linear layers whose ``process_weights_after_loading`` raises ``ValueError(message)``
    on global rank ``rank`` when it processes values (an owned layer), as a platform's repacking
    can fail on one device only; elsewhere, and without values (meta), it does nothing."""
    import torch.distributed as dist
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    class RaisingOnOneRank(UnquantizedLinearMethod):
        def process_weights_after_loading(self, layer):
            if dist.get_rank() == rank and not layer.weight.is_meta:
                raise ValueError(message)

        def apply(self, layer, x, bias=None):
            return torch.nn.functional.linear(x, layer.weight, bias)

    return _quant_config(RaisingOnOneRank())


class QuantStack(nn.Module):
    """``o_proj`` quantized (weight + scale) in every layer."""

    def __init__(self, layers: int = 3, quant_config=None):
        super().__init__()
        from vllm.model_executor.layers.linear import RowParallelLinear

        q = quant_config or int8_config()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"o_proj": RowParallelLinear(HIDDEN, HIDDEN, bias=False, quant_config=q, prefix=f"layers.{i}.o_proj")})
            for i in range(layers)
        )

    def forward(self, h):
        for layer in self.layers:
            o, _ = layer["o_proj"](h)
            h = torch.tanh(o)
        return h


def build_quant(layers: int = 3, seed: int = 0) -> QuantStack:
    torch.manual_seed(seed)
    model = QuantStack(layers)
    process(model)
    return model.eval()


def int8_channel_config():
    """Weight-only int8 as vLLM's own quantization methods declare it: the weight a
    ``ModelWeightParameter`` (int8, ``[out, in]``, ``input_dim=1``, ``output_dim=0``), its
    per-output-channel scale a ``ChannelQuantScaleParameter`` (``output_dim=0``), both loaded by
    the layer's ``weight_loader_v2``. Processing stores the weight transposed for the kernel."""
    from torch.nn import Parameter
    from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
    from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter

    @register_weight_loader_v2_supported_method
    class Int8PerChannel(LinearMethodBase):
        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                           output_size, params_dtype, **extra):
            out, loader = sum(output_partition_sizes), extra["weight_loader"]
            layer.register_parameter("weight", ModelWeightParameter(
                data=torch.empty(out, input_size_per_partition, dtype=torch.int8), input_dim=1, output_dim=0,
                weight_loader=loader))
            layer.register_parameter("weight_scale", ChannelQuantScaleParameter(
                data=torch.empty(out, dtype=torch.float32), output_dim=0, weight_loader=loader))

        def process_weights_after_loading(self, layer):
            layer.weight = Parameter(layer.weight.data.t().contiguous(), requires_grad=False)  # [in, out]
            layer.weight_scale = Parameter(layer.weight_scale.data.clone(), requires_grad=False)

        def apply(self, layer, x, bias=None):
            out = torch.mm(x, layer.weight.float()) * layer.weight_scale
            return out if bias is None else out + bias

    return _quant_config(Int8PerChannel())


class QuantSliceStack(nn.Module):
    """Int8 (``int8_channel_config``) ``q_b_proj`` (ColumnParallelLinear 64 -> 128: output cut) and
    ``o_proj`` (RowParallelLinear 128 -> 64, with a bias: input cut) in every layer."""

    def __init__(self, layers: int = 3, quant_config=None):
        super().__init__()
        from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

        q = quant_config or int8_channel_config()
        self.layers = nn.ModuleList(nn.ModuleDict({
            "q_b_proj": ColumnParallelLinear(HIDDEN, 2 * HIDDEN, bias=False, quant_config=q,
                                             prefix=f"layers.{i}.q_b_proj"),
            "o_proj": RowParallelLinear(2 * HIDDEN, HIDDEN, bias=True, quant_config=q, prefix=f"layers.{i}.o_proj"),
        }) for i in range(layers))

    def forward(self, h):
        for layer in self.layers:
            q, _ = layer["q_b_proj"](h)
            o, _ = layer["o_proj"](torch.tanh(q))
            h = h + o
        return h


def quant_slice_checkpoint(layers: int = 3, seed: int = 0) -> dict:
    """A checkpoint for ``QuantSliceStack``: int8 weights ``[out, in]``, scales, biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for name, (d_out, d_in) in (("q_b_proj", (2 * HIDDEN, HIDDEN)), ("o_proj", (HIDDEN, 2 * HIDDEN))):
            p = f"layers.{i}.{name}"
            out[f"{p}.weight"] = torch.randint(-127, 128, (d_out, d_in), generator=g, dtype=torch.int8)
            out[f"{p}.weight_scale"] = torch.rand(d_out, generator=g) / (64 * d_in ** 0.5) + 1e-4
            if name == "o_proj":
                out[f"{p}.bias"] = 0.1 * torch.randn(d_out, generator=g)
    return out
