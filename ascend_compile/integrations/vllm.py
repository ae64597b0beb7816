"""vLLM integration: the ``vllm.general_plugins`` entry point, config keys, sharding at load.

Turn it on from vLLM's own configuration::

    LLM(...,
        compilation_config={"mode": 2, "backend": "ascend_compile"},           # or mode 1
        additional_config={"ascend_compile": {
            "shared_weight": {"layers": ["o_proj"], "prefetch_step": 1},     # SharedWeightConfig keys
            "compile": {"lowering": "torchair"},                             # backend options (optional)
        }})

``register()`` (run by vLLM in every process that loads plugins; ``VLLM_PLUGINS`` filters it
like any plugin, by the name ``ascend_compile``) wraps the model loader. Between building the
model and reading the checkpoint, the layers this rank does not own become stand-ins whose
weight loader drops the checkpoint tensor and whose ``process_weights_after_loading`` runs
on meta tensors, so a non-owner never materialises, loads or processes their values, yet
has whatever else processing sets (the kernel a layer calls). Owners load and process as
usual (quantized layers and layout changes keep working); afterwards the ranks exchange "ok,
or this error" together with the owners' processed parameter shapes and dtypes (one
``all_gather_object`` that every rank reaches: a rank that failed to build, load or process
alone makes every rank raise there, naming it), the non-owners' stand-ins take those shapes
on the device of the parameters they replace, and the model is sharded: what is shared is
what the kernels read. The backend reads the compile options and vLLM's ``debug_dump_path``
from the current vLLM config.

Weight updates: ``register()`` also wraps the model runner's ``reload_weights``
(``llm.collective_rpc("reload_weights")``): for a sharded model the shared layers are
un-shared for vLLM's layerwise reload and shared again after it, with the same objects, and
the prefetched windows are dropped (``invalidate_after_load_weights``). Refused on a sharded
model, on every worker before anything changes: kernel-format reloads
(``reload_weights(is_checkpoint_format=False)``) and vLLM's weight-transfer sessions
(``Worker.start_weight_update``, in either format). In vLLM 0.23 ``update_weights`` only runs
inside such a session, so on a sharded model it never runs (vLLM raises "start_weight_update
must be called before update_weights").

Modes: 1 (STOCK_TORCH_COMPILE) and 2 (DYNAMO_TRACE_ONCE) hand the whole model graph to the
backend named in ``compilation_config["backend"]``: use ``"ascend_compile"``. Mode 3
(VLLM_COMPILE) compiles pieces split at attention with vLLM's own backend and never calls
ours, and mode 0 (NONE; vLLM sets it for ``enforce_eager=True``, ``TORCH_COMPILE_DISABLE=1``
and ``VLLM_USE_BREAKABLE_CUDAGRAPH=1``) compiles nothing: the shared weights would stay
correct (each marker broadcasts synchronously, one layer at a time) but nothing would be
prefetched; ``check_config`` refuses both so nobody gets the slow path by accident. Platforms
that turn modes 1/2 into NONE (vLLM-Ascend's ``NPUPlatform``) get the user's mode back when
shared weights are configured (``keep_whole_graph_mode``; not when ``enforce_eager`` made it
NONE: vLLM does that before the platform's check, and mode 0 is then refused).
``VLLM_USE_AOT_COMPILE``: our compiled graphs hold a process group and a first-call cross-rank
check and cannot be serialised, so when shared weights are configured the loader sets
``VLLM_USE_AOT_COMPILE=0`` unless the user set it (with 1, torch fails when it tries to
serialise the compiled graph).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import sys

import torch
from typing import Optional

from ..config import ConfigError, SharedWeightConfig

log = logging.getLogger(__name__)

CONFIG_KEY = "ascend_compile"
KEYS = ("shared_weight", "compile", "group")
GROUPS = ("world", "tp", "dp")
BACKEND_NAMES = ("ascend_compile", "ascend_compile.backend.ascend_compile_backend")
_LOADER_PATCHED = "_ascend_compile_wrapped"
_PLATFORM_PATCHED = "_ascend_compile_keeps_mode"
_INVALIDATES = "_ascend_compile_invalidates_windows"
_RELOAD_PATCHED = "_ascend_compile_unshares_for_reload"


def settings(vllm_config) -> dict:
    """The validated ``additional_config["ascend_compile"]`` ({} when absent)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    ours = extra.get(CONFIG_KEY) or {}
    if not isinstance(ours, dict):
        raise ConfigError(f"additional_config[{CONFIG_KEY!r}] must be a dict, got {type(ours).__name__}")
    for key in ours:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown additional_config[{CONFIG_KEY!r}] key {key!r}; known: {list(KEYS)}.{hint}")
    if "group" in ours and ours["group"] not in GROUPS:
        raise ConfigError(f"additional_config[{CONFIG_KEY!r}]['group'] must be one of {list(GROUPS)}, got {ours['group']!r}")
    return ours


def shared_weight_config(vllm_config) -> Optional[SharedWeightConfig]:
    ours = settings(vllm_config)
    if "shared_weight" not in ours:
        return None
    return SharedWeightConfig.from_dict(dict(ours["shared_weight"], group=_group(ours.get("group", "world"))))


def _group(name: str):
    if name == "world":
        return None
    from vllm.distributed import parallel_state as ps

    return (ps.get_tp_group() if name == "tp" else ps.get_dp_group()).device_group


def _mode(compilation_config) -> int:
    """The compilation mode as an int (None, vLLM's default before its config check, is 0)."""
    return int(compilation_config.mode) if compilation_config.mode is not None else 0


def check_config(vllm_config) -> None:
    """Refuse mode/backend combinations that cannot prefetch shared weights, and parallel layouts
    that would be wrong or hang (``check_parallelism``), saying what works. Runs no collective
    and needs no process group."""
    ours = settings(vllm_config)
    if "shared_weight" not in ours:
        return
    cfg = SharedWeightConfig.from_dict(dict(ours["shared_weight"]))  # its keys and values, before any group exists
    check_not_double_sharded(vllm_config, cfg)
    cc = vllm_config.compilation_config
    mode = _mode(cc)
    if mode == 3:
        raise ConfigError(
            "ascend_compile shared weights need compilation_config mode 1 or 2 with backend='ascend_compile': "
            "mode 3 (VLLM_COMPILE) splits the graph at attention and compiles it with vLLM's own backend, so "
            "the broadcasts could not be prefetched. Use compilation_config={'mode': 2, 'backend': 'ascend_compile'}."
        )
    if cc.mode is not None and mode == 0:  # None: vLLM has not decided yet (it does in VllmConfig.__post_init__)
        why, undo = _why_eager(vllm_config)
        raise ConfigError(
            f"ascend_compile shared weights need compilation_config mode 1 or 2 with backend='ascend_compile': "
            f"{why}, so vLLM runs the model eagerly and never calls our backend: every shared layer would be "
            "broadcast synchronously right before it is used, one broadcast per layer, nothing prefetched. Use "
            f"compilation_config={{'mode': 2, 'backend': 'ascend_compile'}}{undo}."
        )
    if mode in (1, 2) and cc.backend not in BACKEND_NAMES:
        raise ConfigError(
            f"compilation_config backend {cc.backend!r} would run the shared weights without prefetching; "
            "set compilation_config={'mode': %d, 'backend': 'ascend_compile'}" % mode
        )
    check_parallelism(vllm_config, ours.get("group", "world"))


def _why_eager(vllm_config) -> tuple:
    """``(why vLLM's config says mode 0, what to undo)``. vLLM 0.23's ``VllmConfig.__post_init__``
    sets mode 0 (NONE) for ``model_config.enforce_eager`` (``LLM(enforce_eager=True)``,
    ``--enforce-eager``), ``TORCH_COMPILE_DISABLE=1`` and ``VLLM_USE_BREAKABLE_CUDAGRAPH=1``."""
    if getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False):
        return ("enforce_eager=True (vLLM then sets compilation mode 0, NONE)",
                " and drop enforce_eager=True (--enforce-eager)")
    for var in ("TORCH_COMPILE_DISABLE", "VLLM_USE_BREAKABLE_CUDAGRAPH"):
        if os.environ.get(var) == "1":
            return f"{var}=1 (vLLM then sets compilation mode 0, NONE)", f" and unset {var}"
    return "compilation mode 0 (NONE)", ""


ASCEND_LAYER_SHARDING = "layer_sharding"  # vLLM-Ascend 0.23's own eager layer sharding (additional_config)


def check_not_double_sharded(vllm_config, cfg: SharedWeightConfig) -> None:
    """Refuse vLLM-Ascend's ``additional_config["layer_sharding"]`` next to our shared weights.

    Both keep each layer's weight on one rank and broadcast it: on the same layers the weights
    would be split twice. On different layers, vLLM-Ascend's eager hooks (``Tensor.set_`` in
    forward pre-hooks) would run inside the graphs we compile, where they do not belong. It is
    not accepted as an alias of ours either: its groups and hooks are vLLM-Ascend's, and one
    explicit config is easier to check than two spellings."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    theirs = extra.get(ASCEND_LAYER_SHARDING)
    if not theirs:
        return
    theirs = [theirs] if isinstance(theirs, str) else list(theirs)
    both = sorted(set(theirs) & set(cfg.layers))
    what = (f"both shard {both}: those weights would be split twice" if both else
            f"shard different layers ({sorted(theirs)} there, {sorted(cfg.layers)} here): vLLM-Ascend's eager "
            "hooks would run inside the graphs ascend_compile compiles")
    merged = sorted(set(theirs) | set(cfg.layers))
    raise ConfigError(
        f"additional_config['layer_sharding'] (vLLM-Ascend's layer sharding) and "
        f"additional_config['{CONFIG_KEY}']['shared_weight'] {what}. Use one: remove 'layer_sharding' and list "
        f"every layer in ours, additional_config={{'{CONFIG_KEY}': {{'shared_weight': {{'layers': {merged}}}}}}}."
    )


def check_parallelism(vllm_config, group: str) -> None:
    """Refuse parallel layouts in which sharing would give wrong tokens or hang, saying what works.

    - Tensor parallelism: each TP rank holds another shard of a Row/ColumnParallelLinear, so a
      shard may only be shared among ranks that hold the same one: the ranks of one TP rank's
      data-parallel group (``group: "dp"``).
    - Pipeline parallelism: stages hold different layers; share within a stage (``"dp"``).
    - Data parallelism in vLLM's multi-process engine (``vllm serve --data-parallel-size``):
      only MoE models run their DP ranks in lockstep (``DPEngineCoreProc``); other models' DP
      ranks run independently, and a rank would wait forever in a broadcast the others never
      join. The external launcher (torchrun, ``distributed_executor_backend="external_launcher"``)
      keeps every model's DP ranks in lockstep (idle ranks run dummy forwards).
    """
    pc = getattr(vllm_config, "parallel_config", None)
    if pc is None:
        return
    tp, pp, dp = (int(getattr(pc, k, 1) or 1) for k in
                  ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"))
    fix_dp = ("set additional_config['ascend_compile']['group'] = 'dp' to share among the data-parallel ranks "
              "that hold the same shard (needs data_parallel_size >= 2)")
    if tp > 1 and group != "dp":
        raise ConfigError(
            f"tensor_parallel_size={tp} with shared weights over group {group!r}: each tensor-parallel rank holds "
            f"another shard of the layers, so broadcasting one rank's shard to another would give wrong results; "
            + fix_dp)
    if pp > 1 and group != "dp":
        raise ConfigError(
            f"pipeline_parallel_size={pp} with shared weights over group {group!r}: pipeline stages hold different "
            "layers; " + fix_dp)
    if dp < 2 and group == "dp":
        independent = ""
        if getattr(pc, "distributed_executor_backend", None) != "external_launcher":
            # vLLM's multi-process engine resets data_parallel_size to 1 in each engine of a model
            # without experts (its DP ranks are independent engines); data_parallel_index keeps the rank
            independent = (" If you started `vllm serve --data-parallel-size N` with a model without experts: vLLM "
                           "runs each data-parallel rank as an independent engine and sets data_parallel_size to 1 "
                           "in it, so there is no lockstep to share weights in; start the ranks with torchrun and "
                           "distributed_executor_backend='external_launcher' instead.")
        raise ConfigError(
            f"shared weights over group {group!r} need 2 or more ranks in it: data_parallel_size={dp}, "
            f"tensor_parallel_size={tp}. Nothing to share with: run data_parallel_size >= 2, or drop "
            f"shared_weight.{independent}")
    launcher = getattr(pc, "distributed_executor_backend", None)
    model_config = getattr(vllm_config, "model_config", None)
    is_moe = bool(getattr(model_config, "is_moe", False))
    if dp > 1 and launcher != "external_launcher" and not is_moe:
        raise ConfigError(
            f"data_parallel_size={dp} in vLLM's multi-process engine: for a model without experts its data-parallel "
            "ranks run independently (only MoE models run in lockstep), so a rank would wait forever in a broadcast "
            "the others never join. Start the ranks with torchrun and distributed_executor_backend="
            "'external_launcher' (every model's ranks then run in lockstep), or serve a MoE model")


_LOADED_CONFIG = None  # the config of the model this process loaded (one engine per process)


def compile_options() -> Optional[dict]:
    """Backend options from the current vLLM config, or None outside vLLM (never imports vLLM)."""
    if "vllm.config" not in sys.modules:
        return None
    from vllm.config import get_current_vllm_config

    try:
        vllm_config = get_current_vllm_config()
    except Exception:  # vLLM 0.23 calls the compiler outside its config context: the loader's config
        vllm_config = _LOADED_CONFIG
    if vllm_config is None:
        return None
    ours = settings(vllm_config)
    options = dict(ours.get("compile") or {})
    dump = getattr(vllm_config.compilation_config, "debug_dump_path", None)
    if dump and "dump_dir" not in options:
        options["dump_dir"] = os.path.join(str(dump), "ascend_compile")
    return options


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
    import copy

    from ..runtime import comm
    from ..runtime.sharding import series_members, standin_like

    pg = comm.resolve_group(cfg.group)
    rank, world = comm.group_rank(pg), comm.group_size(pg)
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
            qm = getattr(module, "quant_method", None)
            if qm is not None:
                wrapped = copy.copy(qm)
                process = _process_keeping_weights if owned else _process_without_values
                wrapped.process_weights_after_loading = functools.partial(process, qm, name, list(params))
                module.quant_method = wrapped
            if qm is not None or not owned:
                skipped.append((name, module, qm, owned, devices))
    return skipped


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
    from ..runtime.comm import ShardingError

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
    ``all_gather_object`` (``comm.gather_or_fail``) that every rank reaches whatever happened,
    so a rank that failed alone makes every rank raise there together, naming that rank and its
    error, instead of leaving its peers in the collective until the group's timeout.

    Each stand-in goes to the device its parameter had before loading (recorded by
    ``skip_non_owned``; processing without values left it on meta), or, for a parameter that
    processing added, to the device of another parameter of the same layer: never to the
    default device."""
    from ..runtime import comm
    from ..runtime.comm import ShardingError
    from ..runtime.sharding import find_series, standin_like

    pg = comm.resolve_group(cfg.group)
    rank = comm.group_rank(pg)

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

    gathered = comm.gather_or_fail(pg, LOADING, processed_here)
    processed = {k: v for g in gathered for k, v in g.items()}
    for name, meta in sorted(processed.items()):
        emptied = [p for p, (shape, _) in meta.items() if 0 in shape]
        if emptied:  # the same on every rank: every rank raises, none hangs
            raise ShardingError(
                f"{name}: process_weights_after_loading left {emptied} with no elements: the platform moved "
                "the weight into a kernel handle (e.g. vLLM CPU's oneDNN / SGL packed GEMM), so the layer's "
                "forward no longer reads the parameter and it cannot be shared. Leave this series out, or "
                "use a platform whose linear layers read their weights."
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
    from ..runtime.comm import RankMismatchError, ShardingError

    for cls in (ConfigError, ShardingError, RankMismatchError):
        if isinstance(error, cls):
            return cls(f"rank {rank}: {error}")
    return ShardingError(f"rank {rank}: {type(error).__name__}: {error}")


def shard_loaded_model(model, vllm_config):
    """Shard ``model`` as ``additional_config`` asks, after its weights are loaded and processed."""
    cfg = shared_weight_config(vllm_config)
    if cfg is None:
        return model
    from ..runtime.sharding import shard_model

    plan = shard_model(model, cfg)
    log.info("ascend_compile: shared %s over %d ranks; this rank saves %.1f MiB",
             sorted(plan.layer_series), plan.world_size, plan.saved_bytes() / 2**20)
    invalidate_after_load_weights(model)
    return model


def invalidate_after_load_weights(model) -> None:
    """Drop the windows prefetched for the next forward whenever ``model.load_weights`` runs again.

    On a sharded model vLLM 0.23 calls ``model.load_weights`` again in checkpoint-format
    ``reload_weights`` (``llm.collective_rpc("reload_weights", ...)``, RL frameworks'
    ``collective_rpc``), on every worker at the same point, which is what ``invalidate_prefetch``
    needs: every rank of the sharing group, together. (Its checkpoint-format ``update_weights``
    calls it too, but only inside a weight-transfer session, which ``refuse_weight_update``
    refuses on a sharded model.)
    """
    from ..runtime.sharding import invalidate_prefetch

    original = getattr(model, "load_weights", None)
    if original is None or getattr(original, _INVALIDATES, False):
        return

    @functools.wraps(original)
    def load_weights(*args, **kwargs):
        loaded = original(*args, **kwargs)
        dropped = invalidate_prefetch(model)
        log.info("ascend_compile: weights loaded again; dropped the prefetched windows %s", dropped)
        return loaded

    setattr(load_weights, _INVALIDATES, True)
    model.load_weights = load_weights


def unshare_for_reload(model, plan) -> list:
    """Before vLLM's layerwise reload: shared layers look as they did at load time.

    ``initialize_layerwise_reload`` deletes each layer's parameters and registers its load-time
    ones again on meta (``register_parameter``), which a parametrized layer refuses: its class
    has a property of that name (``KeyError: "attribute 'weight' already exists"``). So each
    shared layer gets its plain class back (the one ``parametrize`` derived from); an owner's
    real tensor goes back under the parameter name (the reload copies the new values into it,
    keeping the tensor); a non-owner's stand-in stays hidden in its parametrization, and its
    quant method processes without values (``_process_without_values``) as at load. Every
    object is kept, so the modules and classes compiled graphs guard on are the same ones after
    ``reshare_after_reload`` (mode 1 does not recompile). Returns what that function needs."""
    import copy

    modules = dict(model.named_modules())
    by_module: dict = {}
    for sp in plan.params:
        by_module.setdefault(sp.module, []).append(sp)
    state = []
    for mname, sps in by_module.items():
        module, names, owned = modules[mname], [sp.param for sp in sps], sps[0].owner == plan.rank
        cls, plists = module.__class__, module._modules.pop("parametrizations")
        module.__class__ = cls.__bases__[0]  # what parametrize derived the class from
        if owned:
            for pname in names:
                module._parameters[pname] = plists[pname]._parameters.pop("original")
        qm = getattr(module, "quant_method", None)
        if qm is not None:
            wrapped = copy.copy(qm)
            process = _process_keeping_weights if owned else _process_without_values
            wrapped.process_weights_after_loading = functools.partial(process, qm, mname, names)
            module.quant_method = wrapped
        state.append((module, qm, cls, plists, names, owned))
    return state


def reshare_after_reload(state: list) -> None:
    """After the reload: the same parametrizations, classes and quant methods as before it."""
    for module, qm, cls, plists, names, owned in state:
        if qm is not None:
            module.quant_method = qm
        for pname in names:
            p = module._parameters.pop(pname, None)  # an owner's tensor, which vLLM put back
            if owned:
                plists[pname]._parameters["original"] = p
        module._modules["parametrizations"] = plists
        module.__class__ = cls


def reload_unshared(original):
    """Wrap ``GPUModelRunner.reload_weights`` (vLLM's CPU and NPU runners inherit it).

    vLLM 0.23's ``llm.collective_rpc("reload_weights")`` runs it on every worker: in checkpoint
    format, ``initialize_layerwise_reload(model)`` (load-time parameters back on meta),
    ``model.load_weights(...)`` (which our ``invalidate_after_load_weights`` wraps: the
    prefetched windows are dropped), ``finalize_layerwise_reload`` (processing, then a copy
    into the tensors the model held). On a model we sharded it runs between
    ``unshare_for_reload`` and ``reshare_after_reload``. Kernel format
    (``is_checkpoint_format=False``) copies into ``model.get_parameter(name)``, which a shared
    weight is not (a parametrization reads it from its owner): refused on every rank. A reload
    that fails on some ranks only (a checkpoint file missing on one node) makes every rank
    raise (``comm.gather_or_fail`` over the group the model was sharded over), so no rank goes
    on into a forward whose broadcasts its peers will never join."""
    if getattr(original, _RELOAD_PATCHED, False):
        return original

    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def reload_weights(self, *args, **kwargs):
        from ..runtime.comm import ShardingError
        from ..runtime.sharding import get_plan

        model = self.get_model()
        plan = get_plan(model)
        if plan is None:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        if not bound.arguments.get("is_checkpoint_format", True):
            raise ShardingError(
                f"reload_weights(is_checkpoint_format=False) on a model whose {sorted(plan.layer_series)} weights "
                "ascend_compile shares: kernel-format weights are copied into each parameter, and a shared "
                "layer's weight lives on one rank only. Reload with checkpoint-format weights "
                "(is_checkpoint_format=True, the default): every rank loads what it owns.")
        from ..runtime import comm

        state = unshare_for_reload(model, plan)
        result: dict = {}

        def reload() -> None:
            result["value"] = original(self, *args, **kwargs)

        try:  # every rank reloads: one that fails alone makes every rank raise, none runs on into a forward
            comm.gather_or_fail(comm.group_from_name(comm.user_group_of(plan.group_name)), "to reload its weights",
                                reload)
        finally:
            reshare_after_reload(state)
        return result.get("value")

    setattr(reload_weights, _RELOAD_PATCHED, True)
    return reload_weights


def refuse_weight_update(original):
    """Wrap ``Worker.start_weight_update``: refused on a model we sharded.

    vLLM's weight-transfer session (``start_weight_update`` / ``update_weights`` /
    ``finish_weight_update``, RL trainers sending weights) calls ``initialize_layerwise_reload``
    and ``finalize_layerwise_reload`` in separate calls (or, in kernel format, copies into each
    parameter), so a shared layer would stay un-shared between calls, or be written where it
    does not live. Refused before anything changes, on every rank."""
    if getattr(original, _RELOAD_PATCHED, False):
        return original

    @functools.wraps(original)
    def start_weight_update(self, *args, **kwargs):
        from ..runtime.comm import ShardingError
        from ..runtime.sharding import get_plan

        plan = get_plan(self.model_runner.get_model())
        if plan is not None:
            raise ShardingError(
                f"start_weight_update on a model whose {sorted(plan.layer_series)} weights ascend_compile shares: "
                "vLLM's weight-transfer session cannot write weights that live on one rank only. Send the new "
                "weights through reload_weights with checkpoint-format weights instead (on every worker, e.g. "
                "llm.collective_rpc(fn) with fn calling worker.model_runner.reload_weights(weights_iterator=...)), "
                "or drop shared_weight.")
        return original(self, *args, **kwargs)

    setattr(start_weight_update, _RELOAD_PATCHED, True)
    return start_weight_update


def uses_our_backend(vllm_config) -> bool:
    cc = getattr(vllm_config, "compilation_config", None)
    return cc is not None and _mode(cc) in (1, 2) and cc.backend in BACKEND_NAMES


def prepare(vllm_config) -> None:
    """Before the model is built: check the config; switch vLLM's AOT compile off when our backend
    compiles (with or without shared weights), unless the user chose.

    vLLM's AOT compile (``VLLM_USE_AOT_COMPILE``, on by default with torch >= 2.10) serialises
    what the backend returns and refuses a callable that is not torch's ``SerializableCallable``;
    ours are not serialisable (they hold a process group and per-rank schedules).
    """
    global _LOADED_CONFIG
    check_config(vllm_config)
    _LOADED_CONFIG = vllm_config
    if not uses_our_backend(vllm_config):
        return
    if os.environ.get("VLLM_USE_AOT_COMPILE") is None:
        os.environ["VLLM_USE_AOT_COMPILE"] = "0"
        log.info("ascend_compile: VLLM_USE_AOT_COMPILE=0 (the ascend_compile backend's compiled graphs cannot be "
                 "serialised)")
    elif os.environ["VLLM_USE_AOT_COMPILE"] == "1":
        log.warning("ascend_compile: VLLM_USE_AOT_COMPILE=1 was set by you: vLLM will fail to serialise the graphs "
                    "our backend compiles; unset it or set it to 0")


def _wants_whole_graph(vllm_config) -> Optional[tuple]:
    """``(mode, backend)`` when the config shares weights and hands the whole graph to us."""
    cc = getattr(vllm_config, "compilation_config", None)
    # settings(), not shared_weight_config(): this runs inside VllmConfig's own check, before vLLM
    # has made its process groups, so group "tp"/"dp" cannot be resolved yet
    if cc is None or "shared_weight" not in settings(vllm_config):
        return None
    return (cc.mode, cc.backend) if _mode(cc) in (1, 2) and cc.backend in BACKEND_NAMES else None


def keep_whole_graph_mode(platform_cls) -> None:
    """Let ``{"mode": 1 or 2, "backend": "ascend_compile"}`` survive the platform's config check.

    vLLM-Ascend's ``NPUPlatform.check_and_update_config`` turns modes 1 and 2 into NONE ("NPU
    does not support compilation mode"): vLLM's stock path would run Inductor, which cannot
    target the NPU. Our backend lowers to torchair itself, so when shared weights are configured
    the user's mode and backend are put back after the platform's check, and the model runner's
    own graph capture (``cudagraph_mode``) is switched off: capture belongs to the lowering
    (``options["torchair"]["mode"] = "reduce-overhead"``). Other configs are left exactly as the
    platform made them. Safe to call more than once.
    """
    original = platform_cls.check_and_update_config  # a bound classmethod
    if getattr(original, _PLATFORM_PATCHED, False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        wanted = _wants_whole_graph(vllm_config)
        func = getattr(original, "__func__", None)  # None: the platform's hook is a staticmethod
        if func is not None:
            func(cls, vllm_config)
        else:
            original(vllm_config)
        cc = vllm_config.compilation_config
        if wanted is None or (cc.mode, cc.backend) == wanted:
            return
        from vllm.config import CUDAGraphMode

        log.warning("ascend_compile: %s changed compilation mode %s (backend %r) to %s (backend %r); keeping mode "
                    "%s with backend %r for shared weights, cudagraph_mode NONE", cls.__name__, int(wanted[0]),
                    wanted[1], cc.mode, cc.backend, int(wanted[0]), wanted[1])
        cc.mode, cc.backend = wanted
        cc.cudagraph_mode = CUDAGraphMode.NONE

    setattr(check_and_update_config, _PLATFORM_PATCHED, True)
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Safe to call more than once; changes nothing
    for a model whose config does not ask for shared weights."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.platforms import current_platform

    keep_whole_graph_mode(type(current_platform))
    try:  # weight updates of a sharded model; a platform without these modules keeps vLLM's own
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.gpu_worker import Worker
    except Exception as e:  # noqa: BLE001 - the plugin must load whatever the platform imports
        from ..runtime.comm import first_line

        log.warning("ascend_compile: cannot wrap vLLM's reload_weights/start_weight_update (%s): reloading the "
                    "weights of a model with shared weights will fail in vLLM", first_line(e))
    else:
        GPUModelRunner.reload_weights = reload_unshared(GPUModelRunner.reload_weights)
        Worker.start_weight_update = refuse_weight_update(Worker.start_weight_update)

    original = BaseModelLoader.load_model
    if getattr(original, _LOADER_PATCHED, False):
        return

    @functools.wraps(original)
    def load_model(self, vllm_config, model_config, prefix: str = ""):
        prepare(vllm_config)
        cfg = shared_weight_config(vllm_config)
        if cfg is None:
            return original(self, vllm_config, model_config, prefix)
        loader_load_weights = self.load_weights
        skipped: list = []

        def load_weights(model, model_config):
            skipped.extend(skip_non_owned(model, cfg))  # after create_model, before any weight is read
            return loader_load_weights(model, model_config)

        self.load_weights = load_weights
        model, failed = None, None
        try:
            model = original(self, vllm_config, model_config, prefix)
        except Exception as e:  # noqa: BLE001 - carried to the ranks' exchange, where every rank raises together
            failed = e
        finally:
            del self.load_weights
        finish_non_owned(model, cfg, skipped, failed)  # every rank gets here, whatever happened above
        return shard_loaded_model(model, vllm_config)

    setattr(load_model, _LOADER_PATCHED, True)
    BaseModelLoader.load_model = load_model
