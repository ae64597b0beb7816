"""Which modules form a series: found by name, checked to be one layer repeated, and stand-ins for
the layers a rank does not hold."""

from __future__ import annotations

import difflib
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, SharedWeightConfig


def _matches(module_name: str, layer: str) -> bool:
    return module_name == layer or module_name.endswith("." + layer)


def _suffixes(names: list) -> list:
    out = set()
    for n in names:
        parts = n.split(".")
        for i in range(len(parts)):
            out.add(".".join(parts[i:]))
    return sorted(out)


def find_series(model: nn.Module, layers: list) -> dict:
    """Map each listed layer name to the module names it matches, in model order."""
    names = [n for n, _ in model.named_modules() if n]
    found = {layer: [n for n in names if _matches(n, layer)] for layer in layers}
    for layer, members in found.items():
        if not members:
            close = difflib.get_close_matches(layer, _suffixes(names), n=5, cutoff=0.6)
            hint = f" Close matches: {close}." if close else ""
            raise ConfigError(
                f"no module of {type(model).__name__} is named {layer!r} (or ends with '.{layer}').{hint} "
                "List the last part of a repeated layer's name, e.g. 'o_proj'."
            )
    owners: dict = {}
    for layer, members in found.items():
        for m in members:
            if m in owners:
                raise ConfigError(
                    f"module {m!r} matches both {owners[m]!r} and {layer!r}; each layer may be in one series only"
                )
            owners[m] = layer
    return found


def layer_params(module: nn.Module, module_name: str, wanted: Optional[list]) -> dict:
    params = dict(module.named_parameters(recurse=False))
    if wanted is not None:
        missing = [p for p in wanted if p not in params]
        if missing:
            raise ConfigError(f"{module_name} has no parameter(s) {missing}; it has {sorted(params)}")
        params = {k: params[k] for k in wanted}
    empty = [k for k, p in params.items() if p.numel() == 0]
    if empty:
        raise ConfigError(
            f"{module_name}: parameter(s) {empty} have no elements: processing moved them into a kernel handle "
            "(e.g. vLLM CPU's oneDNN GEMM), so the layer's forward does not read them. Shard before processing "
            "(the vLLM plugin does: additional_config['ascend_compile']), or leave this layer out."
        )
    if not params:
        raise ConfigError(
            f"{module_name} ({type(module).__name__}) has no parameters of its own to share; "
            "name the linear layer itself, not its parent"
        )
    return params


def check_series(layer: str, modules: dict) -> None:
    """All members of a series must be the same layer repeated: same params, shapes, dtypes."""
    ref_name, ref = next(iter(modules.items()))
    ref_sig = {k: (tuple(p.shape), p.dtype) for k, p in ref.items()}
    for name, params in modules.items():
        sig = {k: (tuple(p.shape), p.dtype) for k, p in params.items()}
        if sig != ref_sig:
            def fmt(s):
                return ", ".join(f"{k} {list(v[0])} {str(v[1]).replace('torch.', '')}" for k, v in s.items())

            raise ConfigError(
                f"series {layer!r} mixes different layers: {ref_name} has {fmt(ref_sig)} but {name} has "
                f"{fmt(sig)}. A series must be one layer repeated; give the odd layers their own series "
                "name or leave them out."
            )


def series_members(model: nn.Module, config: SharedWeightConfig) -> dict:
    """``{layer series: [(module name, module, {param name: param})]}`` in index order, checked:
    names exist, each module is in one series, members of a series are the same layer."""
    modules = dict(model.named_modules())
    out = {}
    for layer, members in find_series(model, config.layers).items():
        params = {m: layer_params(modules[m], m, config.params) for m in members}
        check_series(layer, params)
        out[layer] = [(m, modules[m], params[m]) for m in members]
    return out


def standin_like(p: torch.Tensor) -> nn.Parameter:
    """Same shape, dtype and device as ``p`` with one element of storage."""
    return nn.Parameter(torch.empty((), dtype=p.dtype, device=p.device).expand(p.shape), requires_grad=False)


def is_standin(t: torch.Tensor) -> bool:
    return t.numel() > 1 and t.untyped_storage().nbytes() <= t.element_size()
