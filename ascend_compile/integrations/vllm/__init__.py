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

The modules: ``config`` (checks), ``options`` (what the backend reads), ``loading`` (sharding at
load), ``reload`` (weight reloads), ``patches`` (every change made to vLLM, behind one version check).
"""

from __future__ import annotations

from .config import (  # noqa: F401
    ASCEND_LAYER_SHARDING, BACKEND_NAMES, CONFIG_KEY, GROUPS, KEYS, check_config, check_not_double_sharded,
    check_parallelism, settings, shared_weight_config, uses_our_backend,
)
from .loading import (  # noqa: F401
    LOADING, _drop_weight, finish_non_owned, shard_loaded_model, skip_non_owned, wrap_processing,
)
from .options import compile_options, prepare  # noqa: F401
from .patches import (  # noqa: F401
    SUPPORTED_VLLM, invalidate_after_load_weights, keep_whole_graph_mode, refuse_weight_update, register,
    reload_unshared, vllm_version_problem,
)
from .reload import reshare_after_reload, unshare_for_reload  # noqa: F401
