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

What can be sliced: a ``RowParallelLinear``, ``ColumnParallelLinear`` or ``ReplicatedLinear``
holding its whole weight (tensor parallel size 1) whose cut dimension divides by the group's
size; unquantized, or quantized by a method whose parameters declare their ``input_dim`` /
``output_dim`` (vLLM's parameter classes do): those with the cut's dimension are cut (the weight,
per-channel scales along it), the rest stay whole, and the method processes and computes on the
slice as on a tensor-parallel shard. Merged and QKV layers (their checkpoint comes in pieces
with shard ids), parameters packed along the cut, weights that declare no dimensions and
tensor-parallel shards are refused, naming the layer and ``layout='layers'``.
"""

from __future__ import annotations

import functools
import logging

import torch

from ...config import ConfigError, SharedWeightConfig
from ...runtime.slice_layout import INPUT_CUT, PRESLICED, SLICE_GEMM, cut_name, cut_of

log = logging.getLogger(__name__)

SLICEABLE = ("RowParallelLinear", "ColumnParallelLinear", "ReplicatedLinear")


@functools.lru_cache(maxsize=None)
def sliced_method_class() -> type:
    """``SlicedLinearMethod``: a subclass of vLLM's ``UnquantizedLinearMethod`` (code that checks for
    an unquantized layer still finds one)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    class SlicedLinearMethod(UnquantizedLinearMethod):
        """The linear method of an unquantized layer this rank holds a slice of."""

        def create_weights(self, *args, **kwargs):
            raise RuntimeError("SlicedLinearMethod is set on a layer whose weights exist; it creates none")

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            """Nothing: the slice stays the parameter ``sliced_linear`` reads and gathers."""

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias=None) -> torch.Tensor:
            return torch.ops.ascend_compile.sliced_linear(x, layer.weight, bias, *layer._ascend_compile_slice)

    return SlicedLinearMethod


@functools.lru_cache(maxsize=None)
def sliced_quant_method_class() -> type:
    """``SlicedQuantMethod``: a quantized layer's own method, processing and computing on its slice
    (as on a tensor-parallel shard), called through ``sliced_linear`` (``SLICE_GEMM``)."""
    from vllm.model_executor.layers.linear import LinearMethodBase

    class SlicedQuantMethod(LinearMethodBase):
        """The linear method of a quantized layer this rank holds a slice of: ``inner``'s processing,
        and ``inner.apply`` on the slice inside ``sliced_linear``."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):  # what else code reads of the quant method is the inner one's
            if name == "inner":
                raise AttributeError(name)
            return getattr(self.inner, name)

        def create_weights(self, *args, **kwargs):
            raise RuntimeError("SlicedQuantMethod is set on a layer whose weights exist; it creates none")

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            self.inner.process_weights_after_loading(layer)  # on the slice, as on a tensor-parallel shard

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias=None) -> torch.Tensor:
            return torch.ops.ascend_compile.sliced_linear(x, layer.weight, bias, *layer._ascend_compile_slice)

    return SlicedQuantMethod


def is_sliceable(module) -> bool:
    """A Row/Column/ReplicatedLinear or a subclass (vLLM-Ascend's ``AscendRowParallelLinear``, ...), not a
    merged or QKV layer (whose checkpoint comes in pieces)."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
    )

    return (isinstance(module, (RowParallelLinear, ColumnParallelLinear, ReplicatedLinear))
            and not isinstance(module, (MergedColumnParallelLinear, QKVParallelLinear)))


def _dims(module) -> tuple:
    """``(input dim, output dim)`` of the layer's weight as created (vLLM's ``input_dim`` /
    ``output_dim`` weight attributes; ``[d_out, d_in]`` when it has none)."""
    w = module._parameters["weight"]
    return getattr(w, "input_dim", 1), getattr(w, "output_dim", 0)


def _whole(module) -> tuple:
    """The whole weight's ``(d_out, d_in)``."""
    w = module._parameters["weight"]
    in_dim, out_dim = _dims(module)
    return int(w.shape[out_dim]), int(w.shape[in_dim])


def check_vllm_sliceable(series: str, members: list, world: int) -> None:
    """``members``: ``[(module name, module, {param: tensor})]`` before loading. Refuses what the
    slices cannot load or compute, naming the layer and the way out."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    out = "use SharedWeightConfig(layout='layers') for this series"
    for name, module, params in members:
        kind = type(module).__name__
        if not is_sliceable(module):
            raise ConfigError(
                f"layout='slices' loads {name} as a slice of one checkpoint tensor, but it is a {kind} (sliced: "
                f"{', '.join(SLICEABLE)} and their subclasses, not merged or QKV layers): {out}"
            )
        if getattr(module, "tp_size", 1) != 1:
            raise ConfigError(
                f"layout='slices' cuts {name}'s whole weight, but this rank holds a tensor-parallel shard of it "
                f"(tp_size={module.tp_size}): {out} with additional_config['ascend_compile']['group'] = 'dp'"
            )
        qm = getattr(module, "quant_method", None)
        if isinstance(qm, UnquantizedLinearMethod):
            if set(params) != {"weight"}:
                raise ConfigError(
                    f"layout='slices' cuts the weight only (the bias stays whole on every rank), but series "
                    f"{series!r} shares {sorted(params)}: drop params= or set params=['weight']"
                )
            continue
        w = module._parameters.get("weight")
        if w is None or not all(hasattr(w, a) for a in ("input_dim", "output_dim")):
            raise ConfigError(
                f"layout='slices' cuts {name} ({type(qm).__name__}) along the dimensions its parameters declare, but "
                f"its weight declares no input_dim/output_dim: {out}"
            )
        cut = cut_of(_whole(module))
        attr = "input_dim" if cut == INPUT_CUT else "output_dim"
        for pname, p in module.named_parameters(recurse=False):
            packed = getattr(p, "packed_dim", None)
            if packed is not None and packed == getattr(p, attr, None):
                raise ConfigError(
                    f"layout='slices' cuts {name} along its {cut_name(cut)} dimension, but {pname} is packed along it "
                    f"({type(qm).__name__}): {out}"
                )
            d = getattr(p, attr, None)
            if pname != "bias" and d is not None and p.shape[d] % world:
                raise ConfigError(
                    f"layout='slices' cuts {name}.{pname} ({list(p.shape)}) along dimension {d}, which does not divide "
                    f"into {world} ranks: {out}"
                )
    d_out, d_in = _whole(members[0][1])
    cut = cut_of((d_out, d_in))
    dim = d_in if cut else d_out
    if dim % world:
        raise ConfigError(
            f"layout='slices' cuts series {series!r} ({d_out}x{d_in}) along its {cut_name(cut)} dimension, {dim}, "
            f"which does not divide into {world} ranks: {out}"
        )


def slice_before_loading(model, cfg: SharedWeightConfig) -> list:
    """After the model is built, before any weight is read: every layer of every series keeps a
    ``1/K`` slice of what it is cut along, and computes through ``sliced_linear``. Returns the
    sliced module names. The full-size allocations the model made are freed here, before loading.

    - Unquantized: the weight is kept as ``runtime.slices`` keeps slices (an input cut as rows of
      ``W.T``), loaded by ``load_slice``, left unprocessed (``SlicedLinearMethod``).
    - Quantized: every parameter with the cut's dimension (``input_dim`` or ``output_dim``; the
      weight and its per-channel scales along it, never the bias) is cut, its own weight loader
      called on the narrowed checkpoint tensor (``load_cut``); the method processes and computes
      on the slice as on a tensor-parallel shard (``SlicedQuantMethod``), every forward moving
      activations (``SLICE_GEMM``: its processed layout is not gathered)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from ...runtime import blocks, groups
    from ...runtime.series import series_members

    rank, world = blocks.position(groups.resolve_group(cfg.group), cfg)
    sliced = []
    for series, members in series_members(model, cfg).items():
        check_vllm_sliceable(series, members, world)
        for name, module, params in members:
            d_out, d_in = _whole(module)
            cut = cut_of((d_out, d_in))
            qm = module.quant_method
            if isinstance(qm, UnquantizedLinearMethod):  # vLLM-Ascend's AscendUnquantizedLinearMethod too
                shapes = _cut_unquantized(name, module, cut, rank, world)
                module.quant_method = sliced_method_class()()
            else:
                shapes = _cut_quantized(name, module, cut, rank, world)
                module.quant_method = sliced_quant_method_class()(qm)
                setattr(module, SLICE_GEMM, functools.partial(_own_gemm, qm, module))
            if cut == INPUT_CUT:  # the sizes a tensor-parallel shard would have: what processing reads
                module.input_size_per_partition = d_in // world
            else:
                module.output_size_per_partition = d_out // world
                module.output_partition_sizes = [d_out // world]
            setattr(module, PRESLICED, {"cut": cut, "whole": (d_out, d_in), "shapes": shapes})
            sliced.append(name)
    log.info("ascend_compile: slicing %d layers over %d ranks before loading; rank %d loads slice %d of each",
             len(sliced), world, rank, rank)
    return sliced


def _own_gemm(quant_method, module, x: torch.Tensor) -> torch.Tensor:
    return quant_method.apply(module, x, None)


def _cut_unquantized(name: str, module, cut: int, rank: int, world: int) -> dict:
    w = module._parameters["weight"]
    whole = tuple(w.shape)
    size = whole[cut] // world
    # laid out as runtime.slices keeps a slice: for an input cut, rows of W.T
    shape = (size, whole[0]) if cut == INPUT_CUT else (size, whole[1])
    part = torch.empty(shape, dtype=w.dtype, device=w.device)
    part = part.t() if cut == INPUT_CUT else part
    p = torch.nn.Parameter(part, requires_grad=False)
    p.weight_loader = functools.partial(load_slice, name, whole, cut, rank * size, size)
    module._parameters["weight"] = p
    return {"weight": whole}


def _cut_quantized(name: str, module, cut: int, rank: int, world: int) -> dict:
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.model_executor.parameter import BasevLLMParameter

    attr = "input_dim" if cut == INPUT_CUT else "output_dim"
    shapes = {}
    for pname, p in list(module.named_parameters(recurse=False)):
        d = getattr(p, attr, None)
        if pname == "bias" or d is None:
            continue  # stays whole on every rank: the bias, per-tensor scales, scales along the other dimension
        whole = tuple(p.shape)
        size = whole[d] // world
        shape = list(whole)
        shape[d] = size
        p.data = torch.empty(shape, dtype=p.dtype, device=p.device)  # the same parameter object and attributes
        own = getattr(p, "weight_loader", None) or default_weight_loader
        loader = functools.partial(load_cut, f"{name}.{pname}", whole, d, rank * size, size, own)
        if isinstance(p, BasevLLMParameter):
            p._weight_loader = loader  # vLLM parameters keep it behind a read-only property
        else:
            p.weight_loader = loader
        shapes[pname] = whole
    return shapes


def _refuse_unless_whole(name: str, what: str, whole: tuple, loaded_weight, pieces) -> None:
    """A sliced loader takes the whole, unsharded checkpoint tensor in one piece, or refuses."""
    if pieces:
        raise ConfigError(f"{name}: its checkpoint {what} comes in pieces ({pieces}), which layout='slices' "
                          "cannot load: use SharedWeightConfig(layout='layers') for this series")
    if tuple(loaded_weight.shape) != whole:
        raise ConfigError(f"{name}: the checkpoint's {what} is {list(loaded_weight.shape)}, the layer's is "
                          f"{list(whole)}: layout='slices' loads whole unsharded {what}s only")


def load_slice(name: str, whole: tuple, cut: int, start: int, size: int, param, loaded_weight, *args, **kwargs) -> None:
    """The weight loader of a sliced layer: this rank's slice of the checkpoint tensor, narrowed
    before anything is copied."""
    _refuse_unless_whole(name, "weight", whole, loaded_weight, args or kwargs)
    param.data.copy_(loaded_weight.narrow(cut, start, size))


def load_cut(name: str, whole: tuple, dim: int, start: int, size: int, loader, param, loaded_weight, *args,
             **kwargs) -> None:
    """The weight loader of a cut parameter of a quantized layer: its own loader, given this rank's
    slice of the checkpoint tensor (with tensor parallel size 1 it narrows nothing further)."""
    _refuse_unless_whole(name, "tensor", whole, loaded_weight, args or kwargs)
    loader(param, loaded_weight.narrow(dim, start, size))
