"""Slices, in the model: the ``sliced_linear`` op every sliced layer calls, and the surgery that routes
the layers through it (``layout="slices"``).

Every read of a sliced layer goes through ``ascend_compile::sliced_linear``, an op with an ordered
effect: backends keep sliced layers in program order (the collectives inside them must be issued
in the same order on every rank), and the op is opaque to
the backend. The maths: ``slice_layout.py``; the path per forward: ``slice_state.py``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import errors, failing, opaque, state
from .slice_layout import INPUT_CUT, PRESLICED, cut_name, cut_of, whole_shape
from .slice_state import SlicedLayer


@torch.library.custom_op("ascend_compile::sliced_linear", mutates_args=())
def sliced_linear(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], series: str, index: int, group_name: str,
    generation: int, out_features: int,
) -> torch.Tensor:
    """``F.linear(x, W, b)`` for the layer whose slice of ``W`` this rank holds as ``w``."""
    key = opaque.sliced_key(series, index, group_name, generation)
    whole = opaque.lookup(key)
    if whole is not None:  # inside fetch_layers: gathered once where the opaque op started
        return F.linear(x, whole, b)
    opaque.check_read(key, sliced=True)
    try:
        return state.get(group_name, generation).slices.linear(x, w, b, series, index)
    except errors.PeerError:
        raise
    except Exception as e:
        failing.abort_group(group_name, e)  # this rank stops inside a forward: its peers' collectives fail at once
        raise


@sliced_linear.register_fake
def _(x, w, b, series, index, group_name, generation, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _register_effect() -> None:
    """Ordered effect: AOTAutograd threads a token through every call, so no backend reorders them."""
    from torch._higher_order_ops.effects import _EffectType, _register_effectful_op

    if hasattr(sliced_linear, "register_effect"):
        sliced_linear.register_effect(_EffectType.ORDERED)
    else:  # the function the method calls
        _register_effectful_op("ascend_compile::sliced_linear", _EffectType.ORDERED)


_register_effect()


def sliced_targets() -> tuple:
    packet = torch.ops.ascend_compile.sliced_linear
    return (packet, packet.default)


def _sliced_forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.ascend_compile.sliced_linear(x, self.weight, self.bias, *self._ascend_compile_slice)


@functools.lru_cache(maxsize=None)
def _sliced_class(cls: type) -> type:
    """``cls`` with its forward through ``sliced_linear`` (one subclass per class)."""
    return type(f"Sliced{cls.__name__}", (cls,), {
        "forward": _sliced_forward,
        "extra_repr": lambda self: (f"{cls.extra_repr(self)}, slice={self._ascend_compile_slice[0]}"
                                    f"[{self._ascend_compile_slice[1]}] ({self._ascend_compile_cut} cut)"),
    })


def slice_modules(per_layer: dict, model_order: dict, rank: int, world: int, group_name: str, generation: int) -> list:
    """Keep this rank's slice of each layer's weight (the rest of its storage is freed) and route the
    layer's forward through ``sliced_linear`` (a layer sliced at load, ``PRESLICED``, already holds
    its slice and routes its GEMM itself). ``model_order``: module name -> its position in the
    model (the order a forward calls the layers). Returns ``[(SlicedLayer, module)]`` in that order."""
    layers = []
    for series, members in per_layer.items():
        for index, (mname, module, params) in enumerate(members):
            w = params["weight"]
            whole = whole_shape(module, w)
            cut = cut_of(whole)
            if not hasattr(module, PRESLICED):
                size = w.shape[cut] // world
                part = w.detach().narrow(cut, rank * size, size)
                # own storage, laid out as gather_source sends it: for an input cut, rows of W.T
                part = part.t().contiguous().t() if cut == INPUT_CUT else part.clone(memory_format=torch.contiguous_format)
                module._parameters["weight"] = nn.Parameter(part, requires_grad=False)
                module.__class__ = _sliced_class(type(module))
            if getattr(module, "bias", None) is not None:
                module.bias.requires_grad_(False)
            module._ascend_compile_slice = (series, index, group_name, generation, whole[0])
            module._ascend_compile_cut = cut_name(cut)
            layers.append((mname, SlicedLayer(series, index, mname, cut, whole), module))
    layers.sort(key=lambda t: model_order[t[0]])
    return [(sl, module) for _, sl, module in layers]
