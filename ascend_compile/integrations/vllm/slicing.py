"""``layout="slices"`` under vLLM: each rank loads, keeps and computes on its slice of every layer.

Between building the model and reading the checkpoint (where ``skip_non_owned`` runs for
``layout="layers"``), ``slice_before_loading`` gives each layer of a series a weight of
``1/K`` of its size, laid out as ``runtime.slices`` keeps slices, whose ``weight_loader`` narrows
the checkpoint tensor to this rank's slice and copies only that; the layer's quant method becomes
``SlicedLinearMethod``, whose ``apply`` is ``ascend_compile::sliced_linear`` (vLLM's own
``forward`` stays: the bias, ``skip_bias_add`` and the ``(output, bias)`` return are vLLM's), and
whose ``process_weights_after_loading`` keeps the slice a readable parameter (vLLM CPU would move
it into a oneDNN handle). ``shard_model`` then finds the layers already sliced (``PRESLICED``),
agrees with the peers and installs the run-time state, as for a sliced ``nn.Linear``.

What can be sliced: an unquantized ``RowParallelLinear``, ``ColumnParallelLinear`` or
``ReplicatedLinear`` holding its whole weight (tensor parallel size 1), sharing ``weight`` only,
whose cut dimension divides by the group's size. Merged and QKV layers (their checkpoint comes
in pieces with shard ids), quantized layers (their scales would have to follow the cut) and
tensor-parallel shards are refused, naming the layer and ``layout='layers'``.
"""

from __future__ import annotations

import functools
import logging

import torch

from ...config import ConfigError, SharedWeightConfig
from ...runtime.slices import INPUT_CUT, PRESLICED, cut_name, cut_of

log = logging.getLogger(__name__)

SLICEABLE = ("RowParallelLinear", "ColumnParallelLinear", "ReplicatedLinear")


@functools.lru_cache(maxsize=None)
def sliced_method_class() -> type:
    """``SlicedLinearMethod``: a subclass of vLLM's ``UnquantizedLinearMethod`` (code that checks for
    an unquantized layer still finds one)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    class SlicedLinearMethod(UnquantizedLinearMethod):
        """The linear method of a layer this rank holds a slice of."""

        def create_weights(self, *args, **kwargs):
            raise RuntimeError("SlicedLinearMethod is set on a layer whose weights exist; it creates none")

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            """Nothing: the slice stays the parameter ``sliced_linear`` reads and gathers."""

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias=None) -> torch.Tensor:
            return torch.ops.ascend_compile.sliced_linear(x, layer.weight, bias, *layer._ascend_compile_slice)

    return SlicedLinearMethod


def check_vllm_sliceable(series: str, members: list, world: int) -> None:
    """``members``: ``[(module name, module, {param: tensor})]`` before loading. Refuses what the
    slices cannot load or compute, naming the layer and the way out."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    out = "use SharedWeightConfig(layout='layers') for this series"
    for name, module, params in members:
        kind = type(module).__name__
        if kind not in SLICEABLE:
            raise ConfigError(
                f"layout='slices' loads {name} as a slice of one checkpoint tensor, but it is a {kind} (sliced: "
                f"{', '.join(SLICEABLE)}): {out}"
            )
        qm = getattr(module, "quant_method", None)
        if type(qm) is not UnquantizedLinearMethod:
            raise ConfigError(
                f"layout='slices' computes {name} on a slice of its weight, but it is quantized "
                f"({type(qm).__name__}), whose scales would have to be cut with it: {out}"
            )
        if getattr(module, "tp_size", 1) != 1:
            raise ConfigError(
                f"layout='slices' cuts {name}'s whole weight, but this rank holds a tensor-parallel shard of it "
                f"(tp_size={module.tp_size}): {out} with additional_config['ascend_compile']['group'] = 'dp'"
            )
        if set(params) != {"weight"}:
            raise ConfigError(
                f"layout='slices' cuts the weight only (the bias stays whole on every rank), but series {series!r} "
                f"shares {sorted(params)}: drop params= or set params=['weight']"
            )
    d_out, d_in = members[0][2]["weight"].shape
    cut = cut_of((d_out, d_in))
    dim = d_in if cut else d_out
    if dim % world:
        raise ConfigError(
            f"layout='slices' cuts series {series!r} ({d_out}x{d_in}) along its {cut_name(cut)} dimension, {dim}, "
            f"which does not divide into {world} ranks: {out}"
        )


def slice_before_loading(model, cfg: SharedWeightConfig) -> list:
    """After the model is built, before any weight is read: every layer of every series keeps a
    ``1/K`` weight, loaded by ``load_slice``, and computes through ``SlicedLinearMethod``. Returns the
    sliced module names. The full-size allocation the model made is freed here, before loading."""
    from ...runtime import comm
    from ...runtime.sharding import series_members

    pg = comm.resolve_group(cfg.group)
    rank, world = comm.group_rank(pg), comm.group_size(pg)
    method = sliced_method_class()
    sliced = []
    for series, members in series_members(model, cfg).items():
        check_vllm_sliceable(series, members, world)
        for name, module, params in members:
            w = params["weight"]
            whole = tuple(w.shape)
            cut = cut_of(whole)
            size = whole[cut] // world
            # laid out as runtime.slices keeps a slice: for an input cut, rows of W.T
            shape = (size, whole[0]) if cut == INPUT_CUT else (size, whole[1])
            part = torch.empty(shape, dtype=w.dtype, device=w.device)
            part = part.t() if cut == INPUT_CUT else part
            p = torch.nn.Parameter(part, requires_grad=False)
            p.weight_loader = functools.partial(load_slice, name, whole, cut, rank * size, size)
            module._parameters["weight"] = p
            setattr(module, PRESLICED, (whole, cut))
            module.quant_method = method()
            sliced.append(name)
    log.info("ascend_compile: slicing %d layers over %d ranks before loading; rank %d loads slice %d of each",
             len(sliced), world, rank, rank)
    return sliced


def load_slice(name: str, whole: tuple, cut: int, start: int, size: int, param, loaded_weight, *args, **kwargs) -> None:
    """The weight loader of a sliced layer: this rank's slice of the checkpoint tensor, narrowed
    before anything is copied."""
    if args or kwargs:
        raise ConfigError(f"{name}: its checkpoint weight comes in pieces ({args or kwargs}), which layout='slices' "
                          "cannot load: use SharedWeightConfig(layout='layers') for this series")
    if tuple(loaded_weight.shape) != whole:
        raise ConfigError(f"{name}: the checkpoint's weight is {list(loaded_weight.shape)}, the layer's is "
                          f"{list(whole)}: layout='slices' loads whole unsharded weights only")
    param.data.copy_(loaded_weight.narrow(cut, start, size))
