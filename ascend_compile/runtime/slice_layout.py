"""Slices, the maths: how a layer is cut, gathered back and computed on its slices (``layout="slices"``).

Every rank keeps ``1/K`` of every layer of a series, and each forward
either moves activations (few tokens) or gathers the weights ahead (many tokens).

A series is cut along the dimension that moves fewer bytes at decode (DESIGN.md section 5b):

- ``d_in > d_out`` (``o_proj``-like), **input cut**: rank ``r`` keeps columns ``[r*c, (r+1)*c)``
  of the weight. Decode: all-to-all the inputs' column blocks, GEMM on the resident block,
  reduce-scatter the partial outputs.
- otherwise (``q_b_proj``-like), **output cut**: rank ``r`` keeps rows ``[r*c, (r+1)*c)``.
  Decode: all-gather the inputs, GEMM on the resident rows, all-to-all the outputs back.

Prefill: the slices of layer ``j + k`` are all-gathered (every link busy) while layer ``j``
computes, and the layer computes as replicated on the whole weight (bitwise equal to it).

Bias stays whole on every rank (``d_out`` elements). Which path a forward takes: ``slice_state.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

INPUT_CUT, OUTPUT_CUT = 1, 0
# {"cut": cut, "whole": (d_out, d_in), "shapes": {param: whole shape}} of a layer an integration sliced
# before loading (vLLM: its parameters are already this rank's slices, its own code routes the GEMM
# through sliced_linear); "shapes" names every parameter that was cut (the weight, and per-channel
# scales along the cut)
PRESLICED = "_ascend_compile_presliced"
# a layer's own GEMM on its slice (an integration's, e.g. a vLLM quant method's apply): such a layer
# computes on its slice at every token count, never gathered (its processed layout may not reassemble)
SLICE_GEMM = "_ascend_compile_slice_gemm"



def whole_shape(module: nn.Module, w: torch.Tensor) -> tuple:
    """The ``[d_out, d_in]`` of the layer's whole weight (``w``: the weight it holds)."""
    presliced = getattr(module, PRESLICED, None)
    return tuple(presliced["whole"]) if presliced is not None else tuple(w.shape)


def shared_params(module: nn.Module, params: dict, world: int) -> dict:
    """``{param: (tensor, whole shape, whole bytes)}`` of what a series member shares, in either
    layout: the configured ``params``, or for a layer an integration sliced at load every parameter
    that was cut (its other parameters, e.g. per-output-channel scales of an input cut, stay whole on
    every rank)."""
    presliced = getattr(module, PRESLICED, None)
    if presliced is None:
        return {k: (p, tuple(p.shape), p.numel() * p.element_size()) for k, p in params.items()}
    own = dict(module.named_parameters(recurse=False))
    # bytes from the slice as processed (processing may change layout or dtype), times the ranks
    return {k: (own[k], tuple(shape), own[k].numel() * own[k].element_size() * world)
            for k, shape in presliced["shapes"].items()}


def cut_of(shape: tuple) -> int:
    """The weight dimension a ``[d_out, d_in]`` weight is cut along: the input (1) when
    ``d_in > d_out``, else the output (0)."""
    d_out, d_in = shape
    return INPUT_CUT if d_in > d_out else OUTPUT_CUT


def cut_name(cut: int) -> str:
    return "input" if cut == INPUT_CUT else "output"


def check_sliceable(series: str, members: list, world: int) -> None:
    """``members``: ``[(module name, module, {param: tensor})]``. Only a plain linear layer
    (``y = x @ W.T + b``, forward not overridden) whose cut dimension divides by the group's size
    can be computed on slices; anything else is refused, naming the layer and the way out."""
    for name, module, params in members:
        if hasattr(module, PRESLICED):
            continue  # sliced at load by an integration, which checked it (vLLM: slicing.check_vllm_sliceable)
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            raise ConfigError(
                f"layout='slices' computes {name} as x @ W.T + b on a slice of W, but it is a "
                f"{type(module).__name__} with its own forward (quantized or vLLM layers are not sliced yet): "
                "use SharedWeightConfig(layout='layers') for this series"
            )
        if set(params) != {"weight"}:
            raise ConfigError(
                f"layout='slices' cuts the weight only (the bias stays whole on every rank), but series {series!r} "
                f"shares {sorted(params)}: drop SharedWeightConfig(params=...) or set params=['weight']"
            )
    d_out, d_in = whole_shape(members[0][1], members[0][2]["weight"])
    cut = cut_of((d_out, d_in))
    dim = d_in if cut == INPUT_CUT else d_out
    if dim % world:
        raise ConfigError(
            f"layout='slices' cuts series {series!r} ({d_out}x{d_in}) along its {cut_name(cut)} dimension, {dim}, "
            f"which does not divide into {world} ranks: use SharedWeightConfig(layout='layers') for it"
        )


class _Works:
    """Several async collectives waited as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        return True


# process-group backends on which a gather is one broadcast per rank instead of an all-gather
BROADCAST_GATHER_BACKENDS = ("gloo",)


def gather_slices(buf: torch.Tensor, w: torch.Tensor, pg, async_op: bool = False):
    """Every rank's ``w`` stacked along dim 0 into ``buf``. An all-gather (HCCL, NCCL), except on gloo,
    whose all-gather took 1.7x the time of one broadcast per rank on these CPU machines (8 MB, 2
    ranks): there each rank broadcasts its slice into its block of ``buf``
    (``BROADCAST_GATHER_BACKENDS``)."""
    if dist.get_backend(pg) not in BROADCAST_GATHER_BACKENDS:
        return dist.all_gather_into_tensor(buf, w, group=pg, async_op=async_op)
    rows, rank = w.shape[0], dist.get_rank(pg)
    buf[rank * rows:(rank + 1) * rows].copy_(w)
    works = [dist.broadcast(buf[s * rows:(s + 1) * rows], group_src=s, group=pg, async_op=True)
             for s in range(pg.size())]
    done = _Works(works)
    if not async_op:
        done.wait()
        return None
    return done


def gather_source(cut: int, w: torch.Tensor) -> torch.Tensor:
    """What a rank sends of its slice ``w`` (the layer's ``[d_out, d_in / K]`` or ``[d_out / K, d_in]``
    weight): a contiguous block whose stacking along dim 0 over the ranks is the whole weight (output
    cut) or its transpose (input cut: the slice is stored as a block of rows of ``W.T``, so the
    gathered weight needs no copy to be used)."""
    return w.t() if cut == INPUT_CUT else w


def reassemble(gathered: torch.Tensor, cut: int) -> torch.Tensor:
    """The ``[d_out, d_in]`` weight (a view) from the ranks' ``gather_source`` stacked along dim 0."""
    return gathered.t() if cut == INPUT_CUT else gathered


def path_collectives(cut: int, path: str) -> list:
    """The collectives one sliced layer issues on ``path``, in order, as dumps name them."""
    if path == "gather":
        return ["all_gather (weight)"]
    if cut == INPUT_CUT:
        return ["all_to_all (inputs)", "reduce_scatter (outputs)"]
    return ["all_gather (inputs)", "all_to_all (outputs)"]


def decode_linear(x: torch.Tensor, w: torch.Tensor, cut: int, tokens: int, pg, collective, name: str = "",
                  gemm=None) -> torch.Tensor:
    """``x @ W.T`` for this rank's ``x`` (``[n, d_in]``, ``n <= tokens``) from every rank's slice
    of ``W``, moving activations only; every rank calls it with the same ``tokens``. ``gemm``: the
    layer's own product with its slice (``SLICE_GEMM``), instead of ``F.linear(., w)``."""
    gemm = gemm or (lambda inp: F.linear(inp, w))
    world = pg.size()
    n, d_in = x.shape
    padded = x if n == tokens else torch.cat([x, x.new_zeros(tokens - n, d_in)])
    if cut == INPUT_CUT:
        c = d_in // world
        send = padded.view(tokens, world, c).transpose(0, 1).contiguous().view(world * tokens, c)
        recv = torch.empty_like(send)
        collective(f"the all-to-all of {name}'s inputs", lambda: dist.all_to_all_single(recv, send, group=pg))
        partial = gemm(recv)  # [world * tokens, d_out]: every rank's rows, this rank's input block
        out = partial.new_empty((tokens, partial.shape[1]))
        collective(f"the reduce-scatter of {name}'s outputs",
                   lambda: dist.reduce_scatter_tensor(out, partial, group=pg))
        return out[:n]
    inputs = padded.new_empty((world * tokens, d_in))
    collective(f"the all-gather of {name}'s inputs", lambda: dist.all_gather_into_tensor(inputs, padded.contiguous(), group=pg))
    partial = gemm(inputs)  # [world * tokens, c]: every rank's rows, this rank's output block
    recv = torch.empty_like(partial)
    collective(f"the all-to-all of {name}'s outputs", lambda: dist.all_to_all_single(recv, partial, group=pg))
    c = partial.shape[1]
    return recv.view(world, tokens, c).permute(1, 0, 2).reshape(tokens, world * c)[:n]
