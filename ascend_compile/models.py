"""Small DeepSeek-shaped decoder stacks built from ``torch.nn`` for the demo, tests and benchmarks.

Each decoder layer has the MLA-style projections of DeepSeek-V2/V3 (``q_a_proj`` ->
``q_b_proj``, ``kv_a_proj``, ``o_proj``) and a gated MLP, so the series users share
(``o_proj``, ``q_b_proj``) repeat once per layer exactly as in the real model. Attention
itself is replaced by a cheap elementwise mix: what matters here is the linear layers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class StackShape:
    layers: int = 8
    hidden: int = 64
    q_lora_rank: int = 32
    heads: int = 4
    head_dim: int = 24
    kv_lora_rank: int = 16
    intermediate: int = 128
    bias: bool = False

    @classmethod
    def scaled(cls, layers: int, hidden: int) -> "StackShape":
        """DeepSeek's proportions at width ``hidden``: q_lora = hidden/2, 8 heads of hidden/4."""
        return cls(layers=layers, hidden=hidden, q_lora_rank=hidden // 2, heads=8, head_dim=hidden // 4,
                   kv_lora_rank=hidden // 4, intermediate=2 * hidden)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, s: StackShape):
        super().__init__()
        qk = s.heads * s.head_dim
        self.q_a_proj = nn.Linear(s.hidden, s.q_lora_rank, bias=s.bias)
        self.q_a_layernorm = RMSNorm(s.q_lora_rank)
        self.q_b_proj = nn.Linear(s.q_lora_rank, qk, bias=s.bias)
        self.kv_a_proj_with_mqa = nn.Linear(s.hidden, s.kv_lora_rank, bias=s.bias)
        self.kv_b_proj = nn.Linear(s.kv_lora_rank, qk, bias=s.bias)
        self.o_proj = nn.Linear(qk, s.hidden, bias=s.bias)

    def forward(self, x):
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        kv = self.kv_b_proj(self.kv_a_proj_with_mqa(x))
        return self.o_proj(q * torch.sigmoid(kv))


class MLP(nn.Module):
    def __init__(self, s: StackShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=s.bias)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=s.bias)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=s.bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: StackShape):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden)
        self.mlp = MLP(s)

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepSeekShapedStack(nn.Module):
    def __init__(self, s: StackShape):
        super().__init__()
        self.shape = s
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden)

    def forward(self, h):
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


def build_stack(shape: StackShape = StackShape(), seed: int = 0, dtype: torch.dtype = torch.float32) -> DeepSeekShapedStack:
    """The same weights on every rank for the same seed (so sharded can be checked against unsharded)."""
    g = torch.Generator().manual_seed(seed)
    model = DeepSeekShapedStack(shape)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if p.dim() == 1 else noise / p.shape[-1] ** 0.5)
    return model.to(dtype).eval().requires_grad_(False)


def make_input(shape: StackShape, tokens: int = 16, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, shape.hidden, generator=g).to(dtype)
