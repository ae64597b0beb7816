"""Sharding at load: non-owned layers become stand-ins before the checkpoint is read, owners load and
process as usual, the ranks exchange "ok, or this error" with the processed shapes, then the model
is sharded."""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from ...config import ConfigError, SharedWeightConfig
from .config import shared_weight_config

log = logging.getLogger(__name__)

def skip_non_owned(model, cfg: SharedWeightConfig) -> list:
    """Before loading: this rank will not load or process the values of the layers it does not own.

    Their parameters become stand-ins (one element of storage) whose ``weight_loader`` drops
    what the checkpoint gives, and their quant method runs ``process_weights_after_loading`` on
    meta tensors (``_process_without_values``). The layers this rank owns process as usual,
    except that a shared parameter the processing would move into a kernel handle stays a
    parameter (``_process_keeping_weights``).
    Returns ``[(name, module, original quant method, owned, devices)]`` for ``finish_non_owned``,
    which puts the quant methods back; ``devices`` maps each parameter of a non-owned layer to
    its device before loading (processing without values leaves them on meta): the stand-ins
    made after processing go there, never to the default device.
    """
    from ...runtime import blocks, groups
    from ...runtime.series import series_members, standin_like

    rank, world = blocks.position(groups.resolve_group(cfg.group), cfg)
    skipped = []
    for members in series_members(model, cfg).values():
        for index, (name, module, params) in enumerate(members):
            owned = index % world == rank
            devices = {} if owned else {k: p.device for k, p in module.named_parameters(recurse=False)}
            if not owned:
                for pname, p in params.items():
                    p.data = standin_like(p).data  # frees the (never written) allocation
                    try:
                        p.weight_loader = _drop_weight
                    except AttributeError:  # vLLM parameters keep it behind a read-only property
                        p._weight_loader = _drop_weight
                    # load_format="dummy" writes parameters directly, without a weight loader: with
                    # this it fills the one element of the stand-in (random values cannot be
                    # written into an expanded tensor)
                    p.dummy_weight_value = 0.0
            qm = wrap_processing(module, name, list(params), owned)
            if qm is not None or not owned:
                skipped.append((name, module, qm, owned, devices))
    return skipped


def wrap_processing(module, name: str, shared: list, owned: bool):
    """Give ``module`` a copy of its quant method whose ``process_weights_after_loading`` processes
    an owner's weights as usual but keeps them (``_process_keeping_weights``), or a non-owner's
    stand-ins without values (``_process_without_values``). Returns the original quant method
    (None if the module has none), to be put back after processing."""
    import copy

    qm = getattr(module, "quant_method", None)
    if qm is not None:
        wrapped = copy.copy(qm)
        process = _process_keeping_weights if owned else _process_without_values
        wrapped.process_weights_after_loading = functools.partial(process, qm, name, list(shared))
        module.quant_method = wrapped
    return qm


def _process_without_values(quant_method, name: str, shared: list, layer) -> None:
    """``process_weights_after_loading`` of a layer this rank does not own, on meta tensors.

    The processing also sets what is not a parameter (on vLLM's CPU platform, the GEMM the
    layer calls: ``layer.cpu_linear``; with meta weights it picks the plain
    ``F.linear(x, weight)``, vLLM's choice for layers without values), and that must exist on
    every rank. On meta tensors it writes and allocates nothing. Processing that cannot run
    without values is skipped: the stand-ins take the owner's processed shapes afterwards.
    """
    for pname in shared:
        p = layer._parameters[pname]
        meta = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        meta.__dict__.update(p.__dict__)  # vLLM's weight attributes (output_dim, weight_loader, ...)
        layer._parameters[pname] = meta
    try:
        quant_method.process_weights_after_loading(layer)
    except Exception as e:  # noqa: BLE001 - any failure means "needs values"; the owner's shapes decide
        log.debug("ascend_compile: %s: process_weights_after_loading needs values (%s: %s); skipped on this "
                  "rank, which does not own the layer", name, type(e).__name__, e)


def _process_keeping_weights(quant_method, name: str, shared: list, layer) -> None:
    """``process_weights_after_loading`` of a layer this rank owns, keeping what is shared readable.

    Some platforms move a weight into a kernel handle and leave an empty parameter (vLLM CPU's
    oneDNN / SGL packed GEMM: ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``);
    the forward then never reads the parameter and it could not be broadcast. For such a
    layer the parameters are put back as loaded and the processing runs again without values
    (``_process_without_values``), which is the platform's own choice for a layer whose values
    it cannot see: on vLLM CPU, the plain ``F.linear(x, weight)`` that reads the parameter.
    That is only right when processing does not change the values; when the value-free
    processing changes a shape or dtype the layer is left emptied, and ``finish_non_owned``
    refuses it on every rank.
    """
    from ...runtime.errors import ShardingError

    loaded = {p: layer._parameters[p] for p in shared if layer._parameters.get(p) is not None}
    try:
        quant_method.process_weights_after_loading(layer)
    except Exception as e:  # noqa: BLE001 - named for the peers, who see only the message (finish_non_owned)
        raise ShardingError(f"{name}: process_weights_after_loading raised {type(e).__name__}: {e}") from e
    emptied = [p for p, t in loaded.items()
               if t.numel() > 0 and (layer._parameters.get(p) is None or layer._parameters[p].numel() == 0)]
    if not emptied:
        return
    processed = {p: layer._parameters.get(p) for p in loaded}
    for p, t in loaded.items():
        layer._parameters[p] = t
    _process_without_values(quant_method, name, shared, layer)
    same = all(layer._parameters.get(p) is not None and tuple(layer._parameters[p].shape) == tuple(t.shape)
               and layer._parameters[p].dtype == t.dtype for p, t in loaded.items())
    for p, t in (loaded if same else processed).items():
        layer._parameters[p] = t
    if same:
        log.info("ascend_compile: %s: processing packed %s into a kernel handle; kept as parameters (shared layers "
                 "read their weights), with the kernel the platform picks for a layer without values", name, emptied)


def _drop_weight(param, loaded_weight, *args, **kwargs) -> None:
    """The weight loader of a layer this rank does not own: the checkpoint tensor is dropped."""


LOADING = "loading the model with shared weights"

def finish_non_owned(model, cfg: SharedWeightConfig, skipped: list, error: Optional[BaseException] = None) -> None:
    """After loading, on every rank of the sharing group together: exchange "ok, or this error"
    along with the owners' processed parameter shapes and dtypes, then give every non-owned
    layer stand-ins shaped like the owner's processed parameters.

    ``error``: what this rank raised since the model was built (``load_model`` catches it:
    ``skip_non_owned``'s checks, loading, the owners' processing). The exchange is one
    ``all_gather_object`` (``failing.gather_or_fail``) that every rank reaches whatever happened,
    so a rank that failed alone makes every rank raise there together, naming that rank and its
    error, instead of leaving its peers in the collective until the group's timeout.

    Each stand-in goes to the device its parameter had before loading (recorded by
    ``skip_non_owned``; processing without values left it on meta), or, for a parameter that
    processing added, to the device of another parameter of the same layer: never to the
    default device."""
    from ...runtime import failing, groups
    from ...runtime.errors import ShardingError
    from ...runtime.series import find_series, standin_like

    pg = groups.resolve_group(cfg.group)
    rank = groups.group_rank(pg)

    def processed_here() -> dict:
        if error is not None:
            raise _failed_here(error, rank) from error
        skipped_names = {name for name, _, _, owned, _ in skipped if not owned}
        modules = dict(model.named_modules())
        mine = {}
        for members in find_series(model, cfg.layers).values():  # processing may have changed the params
            for name in members:
                if name not in skipped_names:
                    params = dict(modules[name].named_parameters(recurse=False))
                    mine[name] = {k: (tuple(p.shape), p.dtype) for k, p in params.items()
                                  if cfg.params is None or k in cfg.params}
        return mine

    gathered = failing.gather_or_fail(pg, LOADING, processed_here)
    processed = {k: v for g in gathered for k, v in g.items()}
    for name, meta in sorted(processed.items()):
        emptied = [p for p, (shape, _) in meta.items() if 0 in shape]
        if emptied:  # the same on every rank: every rank raises, none hangs
            raise ShardingError(
                f"{name}: process_weights_after_loading left {emptied} with no elements: the forward reads a "
                "kernel handle instead (vLLM CPU's oneDNN / SGL packed GEMM), which cannot be shared. Leave this "
                "series out, or use a platform whose linear layers read their weights."
            )
    for name, module, qm, owned, devices in skipped:
        if qm is not None:
            module.quant_method = qm
        if owned:
            continue
        meta = processed[name]
        for pname, p in list(module._parameters.items()):
            if p is not None and pname not in meta and (cfg.params is None or pname in cfg.params):
                del module._parameters[pname]  # processing on the owner dropped it
        for pname, (shape, dtype) in meta.items():
            device = devices[pname] if pname in devices else next(iter(devices.values()))
            module._parameters[pname] = standin_like(torch.empty((), dtype=dtype, device=device).expand(shape))


def _failed_here(error: BaseException, rank: int) -> Exception:
    """What this rank raised while loading, as the ascend_compile error every rank will raise: its
    own class when it is one of ours (``ConfigError``, ``ShardingError``, ``RankMismatchError``),
    else ``ShardingError``, naming this rank and the error."""
    from ...runtime.errors import RankMismatchError, ShardingError

    for cls in (ConfigError, ShardingError, RankMismatchError):
        if isinstance(error, cls):
            return cls(f"rank {rank}: {error}")
    return ShardingError(f"rank {rank}: {type(error).__name__}: {error}")


def shard_loaded_model(model, vllm_config):
    """Shard ``model`` as ``additional_config`` asks, after its weights are loaded and processed."""
    cfg = shared_weight_config(vllm_config)
    if cfg is None:
        return model
    from ...runtime.sharding import shard_model

    plan = shard_model(model, cfg)
    log.info("ascend_compile: shared %s over %d ranks (layout %r); rank %d of them holds %.2f MiB of their %.2f MiB, "
             "and saves %.2f MiB", sorted(plan.layer_series), plan.world_size, plan.layout, plan.rank,
             plan.owned_bytes() / 2**20, plan.series_bytes() / 2**20, plan.saved_bytes() / 2**20)
    if plan.layout == "slices":
        log.info("ascend_compile: forwards of up to %d tokens (the most of any rank) compute on the slices, larger ones "
                 "gather the weights%s", plan.decode_tokens,
                 f" ({plan.decode_explanation})" if plan.decode_explanation else "")
    return model
