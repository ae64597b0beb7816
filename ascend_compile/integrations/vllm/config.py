"""vLLM config checks: the ``additional_config["ascend_compile"]`` keys, the compilation modes and
parallel layouts shared weights work with, refused with the fix otherwise (at load, on every rank)."""

from __future__ import annotations

import difflib
import logging
import os
from typing import Optional

from ...config import ConfigError, SharedWeightConfig

log = logging.getLogger(__name__)

CONFIG_KEY = "ascend_compile"

KEYS = ("shared_weight", "compile", "group")

GROUPS = ("world", "tp", "dp")

BACKEND_NAMES = ("ascend_compile", "ascend_compile.backend.ascend_compile_backend")

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
    d = dict(_shared_settings(vllm_config), group=_group(ours.get("group", "world")))
    if d.get("share_size") == "machine" and d.get("ranks_per_machine") is None and not os.environ.get("GROUP_WORLD_SIZE"):
        # vLLM started the ranks (no torchrun); its CPU platform rewrites LOCAL_WORLD_SIZE to the TP size
        d["ranks_per_machine"] = _ranks_per_machine(vllm_config)
    return SharedWeightConfig.from_dict(d)


def _shared_settings(vllm_config) -> dict:
    """``additional_config["ascend_compile"]["shared_weight"]`` with the defaults of the compilation mode:
    under mode 3 whole layers are not prefetched across forwards (``wrap_around=False``): nothing crosses
    a piece of vLLM's graph."""
    d = dict(settings(vllm_config)["shared_weight"])
    if _mode(vllm_config.compilation_config) == 3 and d.get("layout", "layers") == "layers":
        d.setdefault("wrap_around", False)
    return d


def _ranks_per_machine(vllm_config) -> Optional[int]:
    """Ranks on one machine as vLLM's config has them: its local data-parallel ranks, each with its
    tensor- and pipeline-parallel ranks (``data_parallel_size_local`` x TP x PP)."""
    pc = getattr(vllm_config, "parallel_config", None)
    local = getattr(pc, "data_parallel_size_local", None)
    if not local:
        return None
    return int(local) * _tp(vllm_config) * int(getattr(pc, "pipeline_parallel_size", 1) or 1)


def _group(name: str):
    if name == "world":
        return None
    from vllm.distributed import parallel_state as ps

    return (ps.get_tp_group() if name == "tp" else ps.get_dp_group()).device_group


def _mode(compilation_config) -> int:
    """The compilation mode as an int (None, vLLM's default before its config check, is 0)."""
    return int(compilation_config.mode) if compilation_config.mode is not None else 0


def _tp(vllm_config) -> int:
    return int(getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", 1) or 1)


def check_config(vllm_config) -> None:
    """Refuse mode/backend combinations that cannot prefetch shared weights, and parallel layouts
    that would be wrong or hang (``check_parallelism``), saying what works. Runs no collective
    and needs no process group."""
    ours = settings(vllm_config)
    if "shared_weight" not in ours:
        return
    cfg = SharedWeightConfig.from_dict(_shared_settings(vllm_config))  # its keys and values, before any group exists
    check_not_double_sharded(vllm_config, cfg)
    if cfg.layout == "slices" and _tp(vllm_config) > 1:
        raise ConfigError(
            f"shared_weight layout='slices' under vLLM cuts each layer's whole weight, but tensor_parallel_size="
            f"{_tp(vllm_config)} gives every rank a shard of it: use layout='layers' with "
            "additional_config['ascend_compile']['group'] = 'dp', or tensor_parallel_size=1"
        )
    cc = vllm_config.compilation_config
    mode = _mode(cc)
    if mode == 3:
        check_pieces(cc, cfg, ours.get("compile"))
    else:
        check_whole_graph(vllm_config, cfg)
    check_parallelism(vllm_config, ours.get("group", "world"))
    check_share_size(vllm_config, cfg, ours.get("group", "world"))


def check_whole_graph(vllm_config, cfg: SharedWeightConfig) -> None:
    """Modes 0-2: our backend must get the whole graph (modes 1 and 2 with backend='ascend_compile')."""
    cc = vllm_config.compilation_config
    mode = _mode(cc)
    if cfg.paths == "by_shape":
        raise ConfigError(
            "shared_weight paths='by_shape' is for graphs captured at a fixed token count, equal on every rank "
            "(compilation mode 3 with cudagraph_mode on); under modes 1 and 2 vLLM's data-parallel ranks run "
            "different token counts: drop paths (the default, 'agreed')"
        )
    if cc.mode is not None and mode == 0:  # None: vLLM has not decided yet (it does in VllmConfig.__post_init__)
        why, undo = _why_eager(vllm_config)
        raise ConfigError(
            f"ascend_compile shared weights need a compiled model (compilation_config mode 3, or mode 1 or 2 with "
            f"backend='ascend_compile'): {why}, so vLLM runs the model eagerly and never calls our passes: every "
            "shared layer would be "
            "broadcast synchronously right before it is used, one broadcast per layer, nothing prefetched. Use "
            f"compilation_config={{'mode': 2, 'backend': 'ascend_compile'}}{undo}."
        )
    if mode in (1, 2) and cc.backend not in BACKEND_NAMES:
        raise ConfigError(
            f"compilation_config backend {cc.backend!r} would run the shared weights without prefetching; "
            "set compilation_config={'mode': %d, 'backend': 'ascend_compile'}" % mode
        )


def captures(compilation_config) -> bool:
    """Whether vLLM captures graphs (CUDA/ACL) under this config: ``cudagraph_mode`` other than NONE
    (None, before vLLM's own check, is its mode-3 default, FULL_AND_PIECEWISE)."""
    mode = getattr(compilation_config, "cudagraph_mode", None)
    return mode is None or getattr(mode, "name", str(mode)) != "NONE"


def check_pieces(compilation_config, cfg: SharedWeightConfig, compile_options: Optional[dict] = None) -> None:
    """Mode 3 (VLLM_COMPILE): vLLM splits the graph at attention and compiles each piece with its own
    backend and pass manager (ours among its passes: ``pieces.py``). Whole layers are scheduled inside
    each piece (no window across pieces: ``wrap_around`` refused). Sliced layers run there as one op
    each, kept in order by its effect; with graph capture, only with ``paths="by_shape"``."""
    if compilation_config.backend in BACKEND_NAMES:
        raise ConfigError(
            "compilation_config mode 3 (VLLM_COMPILE) compiles the pieces with vLLM's own backend and passes ours to "
            "its pass manager: drop backend='ascend_compile' (it is for modes 1 and 2)"
        )
    lowering = (compile_options or {}).get("lowering")
    if lowering is not None:
        raise ConfigError(
            f"additional_config['ascend_compile']['compile']['lowering']={lowering!r} chooses our backend's lowering, "
            "but under compilation_config mode 3 (VLLM_COMPILE) vLLM lowers each piece with its own backend: drop it"
        )
    if cfg.layout == "layers":
        if cfg.wrap_around:
            raise ConfigError(
                "shared_weight wrap_around=True prefetches the first layers of each forward during the one before, "
                "but compilation_config mode 3 (VLLM_COMPILE) compiles (and captures) each piece of the graph on its "
                "own, and a broadcast cannot stay in flight between pieces: drop wrap_around (mode 3 defaults it to "
                "False), or use compilation_config={'mode': 2, 'backend': 'ascend_compile'}"
            )
        return
    if captures(compilation_config) and cfg.paths != "by_shape":
        raise ConfigError(
            f"compilation_config cudagraph_mode={getattr(compilation_config.cudagraph_mode, 'name', 'default')} "
            "captures graphs, and sliced layers with paths='agreed' agree on their path with a host sync that capture "
            "refuses: set shared_weight paths='by_shape' (every data-parallel rank runs the same padded token count "
            "under capture), or cudagraph_mode='NONE'"
        )
    if not captures(compilation_config) and cfg.paths == "by_shape":
        raise ConfigError(
            "shared_weight paths='by_shape' needs every rank to run the same token count, which vLLM's data-parallel "
            "padding gives under graph capture, and cudagraph_mode is NONE: drop paths (the default, 'agreed')"
        )


def check_share_size(vllm_config, cfg: SharedWeightConfig, group: str) -> None:
    """A numeric ``share_size`` must divide the sharing group's size, known from the config alone."""
    from ...runtime import blocks

    pc = getattr(vllm_config, "parallel_config", None)
    if pc is None or not isinstance(cfg.share_size, int):
        return
    tp, pp, dp = (int(getattr(pc, k, 1) or 1) for k in
                  ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"))
    size = {"dp": dp, "tp": tp}.get(group, tp * pp * dp)
    blocks.split(range(size), cfg.share_size, group=group)


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
    cudagraph = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if cudagraph is not None and getattr(cudagraph, "name", str(cudagraph)) == "NONE":
        # vllm_ascend/platform.py (v0.23.0) check_and_update_config: cudagraph_mode NONE -> CompilationMode.NONE
        return ("compilation mode 0 (NONE; vLLM-Ascend 0.23 sets it whenever cudagraph_mode is NONE)",
                ", or keep vLLM-Ascend's default, compilation mode 3 with graph capture (cudagraph_mode "
                "FULL_AND_PIECEWISE or PIECEWISE)")
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
            independent = (" (`vllm serve --data-parallel-size N` runs a model without experts as independent "
                           "engines, each with data_parallel_size=1: start the ranks with torchrun and "
                           "distributed_executor_backend='external_launcher')")
        raise ConfigError(
            f"shared weights over group {group!r} need 2 or more ranks in it: data_parallel_size={dp}, "
            f"tensor_parallel_size={tp}. Run data_parallel_size >= 2{independent}, or drop shared_weight.")
    launcher = getattr(pc, "distributed_executor_backend", None)
    model_config = getattr(vllm_config, "model_config", None)
    is_moe = bool(getattr(model_config, "is_moe", False))
    if dp > 1 and launcher != "external_launcher" and not is_moe:
        raise ConfigError(
            f"data_parallel_size={dp} in vLLM's multi-process engine runs the data-parallel ranks of a model without "
            "experts independently: a rank would wait forever in a broadcast the others never join. Start the ranks "
            "with torchrun and distributed_executor_backend='external_launcher', or serve a MoE model.")


def uses_our_backend(vllm_config) -> bool:
    cc = getattr(vllm_config, "compilation_config", None)
    return cc is not None and _mode(cc) in (1, 2) and cc.backend in BACKEND_NAMES


def _wants_whole_graph(vllm_config) -> Optional[tuple]:
    """``(mode, backend)`` when the config shares weights and hands the whole graph to us."""
    cc = getattr(vllm_config, "compilation_config", None)
    # settings(), not shared_weight_config(): this runs inside VllmConfig's own check, before vLLM
    # has made its process groups, so group "tp"/"dp" cannot be resolved yet
    if cc is None or "shared_weight" not in settings(vllm_config):
        return None
    return (cc.mode, cc.backend) if _mode(cc) in (1, 2) and cc.backend in BACKEND_NAMES else None
