"""Every change this project makes to vLLM, in one place, behind one version check.

``register()`` (the ``vllm.general_plugins`` entry point) wraps vLLM's model loader
(``BaseModelLoader.load_model``: sharding at load), the model runner's ``reload_weights``
(un-share, reload, share again; every rank fails together), the worker's ``start_weight_update``
(refused on a sharded model) and the platform's ``check_and_update_config`` (keeps modes 1/2 with
our backend); after loading, the model's own ``load_weights`` (drops the prefetched windows). On
a vLLM other than the one these were written against, none of them is installed: a config that
asks for shared weights is refused at load with one message saying so.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

from ...config import CompileOptions, ConfigError
from .attention import check_attention_readers, fetch_in_attention_readers
from .config import CONFIG_KEY, _wants_whole_graph, settings, shared_weight_config
from .loading import finish_non_owned, shard_loaded_model, skip_non_owned
from .options import compile_options, prepare
from .reload import reshare_after_reload, unshare_for_reload
from .slicing import slice_before_loading

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.23.",)  # the vLLM of vLLM-Ascend 0.23; the patches below follow its code
SUPPORTED_VLLM_ASCEND = ("0.23.",)  # integrations/vllm/attention.py follows its mla_v1.py

_LOADER_PATCHED = "_ascend_compile_wrapped"

_PLATFORM_PATCHED = "_ascend_compile_keeps_mode"

_INVALIDATES = "_ascend_compile_invalidates_windows"

_RELOAD_PATCHED = "_ascend_compile_unshares_for_reload"

def invalidate_after_load_weights(model) -> None:
    """Drop the windows prefetched for the next forward whenever ``model.load_weights`` runs again.

    On a sharded model vLLM 0.23 calls ``model.load_weights`` again in checkpoint-format
    ``reload_weights`` (``llm.collective_rpc("reload_weights", ...)``, RL frameworks'
    ``collective_rpc``), on every worker at the same point, which is what ``invalidate_prefetch``
    needs: every rank of the sharing group, together. (Its checkpoint-format ``update_weights``
    calls it too, but only inside a weight-transfer session, which ``refuse_weight_update``
    refuses on a sharded model.)
    """
    from ...runtime.sharding import invalidate_prefetch

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
    raise (``failing.gather_or_fail`` over the group the model was sharded over), so no rank goes
    on into a forward whose broadcasts its peers will never join."""
    if getattr(original, _RELOAD_PATCHED, False):
        return original

    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def reload_weights(self, *args, **kwargs):
        from ...runtime.errors import ShardingError
        from ...runtime.sharding import get_plan

        model = self.get_model()
        plan = get_plan(model)
        if plan is None:
            return original(self, *args, **kwargs)
        if plan.layout == "slices":  # the same plan on every rank: every rank raises, before anything changes
            raise ShardingError(
                f"reload_weights on a model whose {sorted(plan.layer_series)} weights ascend_compile keeps as slices "
                "(layout='slices'): reloading slices is not supported yet. Use layout='layers', or restart the "
                "engine to load new weights.")
        bound = signature.bind(self, *args, **kwargs)
        if not bound.arguments.get("is_checkpoint_format", True):
            raise ShardingError(
                f"reload_weights(is_checkpoint_format=False) on a model whose {sorted(plan.layer_series)} weights "
                "ascend_compile shares: kernel-format weights are copied into every rank's parameter, and a shared "
                "one lives on one rank only. Reload with checkpoint-format weights (is_checkpoint_format=True).")
        from ...runtime import failing, groups, state

        kept = unshare_for_reload(model, plan)
        result: dict = {}

        def reload() -> None:
            result["value"] = original(self, *args, **kwargs)

        try:  # every rank reloads: one that fails alone makes every rank raise, none runs on into a forward
            failing.gather_or_fail(groups.group_from_name(state.user_group_of(plan.group_name)), "to reload its weights",
                                   reload)
        finally:
            reshare_after_reload(kept)
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
        from ...runtime.errors import ShardingError
        from ...runtime.sharding import get_plan

        plan = get_plan(self.model_runner.get_model())
        if plan is not None:
            raise ShardingError(
                f"start_weight_update on a model whose {sorted(plan.layer_series)} weights ascend_compile shares: "
                "vLLM's weight transfer cannot write weights that live on one rank. Use reload_weights with "
                "checkpoint-format weights on every worker (llm.collective_rpc(fn), fn calling "
                "worker.model_runner.reload_weights(weights_iterator=...)), or drop shared_weight.")
        return original(self, *args, **kwargs)

    setattr(start_weight_update, _RELOAD_PATCHED, True)
    return start_weight_update


def refuse_weight_update_on(worker_cls) -> Optional[type]:
    """Wrap ``start_weight_update`` of the worker class that actually runs (``parallel_config.worker_cls``:
    vLLM's GPU/CPU ``Worker``, vLLM-Ascend's ``NPUWorker(WorkerBase)``, ...), where it has one. Returns the
    class, or None where there is none to wrap."""
    if not worker_cls or worker_cls == "auto":
        return None
    if isinstance(worker_cls, str):
        try:
            from vllm.utils.import_utils import resolve_obj_by_qualname

            worker_cls = resolve_obj_by_qualname(worker_cls)
        except Exception as e:  # noqa: BLE001 - the loader must not fail on what only a weight update needs
            log.warning("ascend_compile: cannot resolve the worker class %r (%s): its start_weight_update is not "
                        "refused on a sharded model", worker_cls, e)
            return None
    method = getattr(worker_cls, "start_weight_update", None)
    if method is None:
        return None
    if not getattr(method, _RELOAD_PATCHED, False):
        worker_cls.start_weight_update = refuse_weight_update(method)
    return worker_cls


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


def installed_vllm_ascend() -> Optional[str]:
    """vLLM-Ascend's version, from its package metadata (importing ``vllm_ascend`` imports torch_npu),
    or None where it is not installed."""
    from importlib import metadata

    for name in ("vllm-ascend", "vllm_ascend"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_version_problem(version: str, ascend: Optional[str] = None) -> Optional[str]:
    """Why the patches below cannot be installed on vLLM ``version`` (with vLLM-Ascend ``ascend``, when
    installed; None: they can). They follow vLLM 0.23's code and vLLM-Ascend 0.23's attention ops."""
    if ascend is not None and not ascend.startswith(SUPPORTED_VLLM_ASCEND):
        return (f"ascend_compile's vLLM integration is written against vLLM-Ascend "
                f"{', '.join(v + 'x' for v in SUPPORTED_VLLM_ASCEND)} (where its MLA attention op reads q_b_proj and "
                f"o_proj), and this is vLLM-Ascend {ascend}: its shared weights are not installed. Run vLLM-Ascend 0.23, "
                f"or remove additional_config[{CONFIG_KEY!r}]['shared_weight'].")
    if version.startswith(SUPPORTED_VLLM):
        return None
    return (f"ascend_compile's vLLM integration is written against vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)} "
            f"(it changes vLLM's model loader, model runner, worker and platform check), and this is vLLM {version}: "
            "its shared weights are not installed. Run vLLM 0.23 (vLLM-Ascend 0.23), or remove "
            f"additional_config[{CONFIG_KEY!r}]['shared_weight'].")


def _refuse_on_this_vllm(original, problem: str):
    """``BaseModelLoader.load_model`` for an unsupported vLLM: models without shared weights load as
    usual; one whose config asks for them is refused before anything is built."""
    if getattr(original, _LOADER_PATCHED, False):
        return original

    @functools.wraps(original)
    def load_model(self, vllm_config, model_config, prefix: str = ""):
        if "shared_weight" in settings(vllm_config):
            raise ConfigError(problem)
        return original(self, vllm_config, model_config, prefix)

    setattr(load_model, _LOADER_PATCHED, True)
    return load_model


def _log_like_vllm() -> None:
    """Our INFO lines (what was shared, what each rank saved, the windows dropped at a reload) where
    vLLM's own go, in every process that loads plugins (``vllm serve``'s engine cores and workers
    included), unless logging was configured already (our logger or the root one has handlers)."""
    ours, theirs = logging.getLogger("ascend_compile"), logging.getLogger("vllm")
    if ours.handlers or logging.getLogger().handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Safe to call more than once; changes nothing
    for a model whose config does not ask for shared weights."""
    import vllm
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.platforms import current_platform

    _log_like_vllm()
    problem = vllm_version_problem(getattr(vllm, "__version__", "unknown"), installed_vllm_ascend())
    if problem is not None:
        log.warning("ascend_compile: %s", problem)
        BaseModelLoader.load_model = _refuse_on_this_vllm(BaseModelLoader.load_model, problem)
        return
    keep_whole_graph_mode(type(current_platform))
    try:  # weight updates of a sharded model; a platform without these modules keeps vLLM's own
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.gpu_worker import Worker
    except Exception as e:  # noqa: BLE001 - the plugin must load whatever the platform imports
        from ...runtime.errors import first_line

        log.warning("ascend_compile: cannot wrap vLLM's reload_weights/start_weight_update (%s): reloading the "
                    "weights of a model with shared weights will fail in vLLM", first_line(e))
    else:
        GPUModelRunner.reload_weights = reload_unshared(GPUModelRunner.reload_weights)
        refuse_weight_update_on(Worker)

    original = BaseModelLoader.load_model
    if getattr(original, _LOADER_PATCHED, False):
        return

    @functools.wraps(original)
    def load_model(self, vllm_config, model_config, prefix: str = ""):
        prepare(vllm_config)
        cfg = shared_weight_config(vllm_config)
        if cfg is None:
            return original(self, vllm_config, model_config, prefix)
        refuse_weight_update_on(getattr(vllm_config.parallel_config, "worker_cls", None))
        loader_load_weights = self.load_weights
        skipped: list = []

        def load_weights(model, model_config):
            # after create_model, before any weight is read
            check_attention_readers(model, cfg)
            if cfg.layout == "slices":
                slice_before_loading(model, cfg)
            else:
                skipped.extend(skip_non_owned(model, cfg))
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
        model = shard_loaded_model(model, vllm_config)
        # layers read inside attention ops: fetched once where the op starts, the next ops' prefetched there
        fetch_in_attention_readers(model, CompileOptions.from_dict(compile_options()).dump_dir)
        invalidate_after_load_weights(model)  # a later load_weights (a reload) drops the prefetched windows
        return model

    setattr(load_model, _LOADER_PATCHED, True)
    BaseModelLoader.load_model = load_model
