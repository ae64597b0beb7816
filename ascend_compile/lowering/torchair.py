"""torchair: Ascend NPU graph execution (GE ``max-autotune`` or ``reduce-overhead``/npugraph_ex).

NOT VERIFIED ON HARDWARE: the adapter is tested only against a fake torchair that records
what it is given (tests/fake_torchair.py). docs/npu_runbook.md says how to check it on an
Atlas A2/A3.

``torchair.get_npu_backend(compiler_config=...)`` is itself a Dynamo backend that runs
AOTAutograd, so Dynamo's graph goes to it unchanged and our passes run inside it as its
``post_grad_custom_post_pass`` (signature ``(gm, example_inputs, config)``), on the aten
graph, after torchair's own FX passes, exactly where they run for Inductor. The broadcasts
stay functional (torchair converts ``_c10d_functional.broadcast`` to HcomBroadcast and
``wait_tensor`` to an identity) and go on a stream of their own, ordered with events
(passes/npu_streams.py). Nothing here imports ``torch_npu`` until this lowering is used.
"""

from __future__ import annotations

from ..config import ConfigError

INPLACE_BROADCAST = False  # torchair converts the functional broadcast
PINS_ORDER = False  # ordering is stated with streams and events instead of control_deps
STREAMS = True
# No prefetch across steps: a GE graph's HcomBroadcast completes within the graph run that issued
# it (GE has no tensor that outlives a run with a collective still writing it), and an aclgraph
# (npugraph_ex) replays a fixed task list, so a broadcast cannot be issued in one captured graph
# and waited in the next. The window ops (runtime/windows.py) are Python ops with no GE converter.
# Graphs lowered here fetch their first layers at entry; see docs/npu_runbook.md.
WRAP_AROUND = False

# options["torchair"] keys -> where they go on torchair.CompilerConfig
CONFIG_KEYS = {
    "mode": "mode",  # "max-autotune" (GE graph) or "reduce-overhead" (npugraph_ex / aclgraph)
    "graph_dump_type": "debug.graph_dump.type",  # "txt", "pbtxt", "py"
    "graph_dump_path": "debug.graph_dump.path",
    "frozen_parameter": "experimental_config.frozen_parameter",  # weights as constants of the graph
    "keep_inference_input_mutations": "experimental_config.keep_inference_input_mutations",
    "tiling_schedule_optimize": "experimental_config.tiling_schedule_optimize",
    "static_model_ops_lower_limit": "experimental_config.static_model_ops_lower_limit",
    "clone_input": "debug.aclgraph.clone_input",
}
MODES = ("max-autotune", "reduce-overhead")
# ACL graph capture by default: it runs every op as it is (vLLM-Ascend's attention ops are Python custom ops
# without a GE converter) and is what vLLM-Ascend's own graph mode uses; GE (max-autotune) only when asked
DEFAULT_MODE = "reduce-overhead"


def import_torchair():
    """``torchair``, or a clear error saying what is missing and what to do instead."""
    try:
        import torch_npu  # noqa: F401  (registers the NPU device and HCCL)
    except Exception as e:
        raise RuntimeError(
            f"lowering='torchair' needs torch_npu with CANN on an Ascend NPU machine; importing torch_npu "
            f"failed: {type(e).__name__}: {e}. Off NPU use options={{'lowering': 'inductor'}}."
        ) from e
    try:
        import torchair
    except ImportError:
        try:
            from torch_npu.dynamo import torchair
        except ImportError as e:
            raise RuntimeError(
                "lowering='torchair' needs torchair (shipped with torch_npu); it is not importable: "
                f"{e}. Install the torch_npu that matches your CANN."
            ) from e
    return torchair


def compiler_config(torchair, settings: dict, pipeline=None):
    """A ``torchair.CompilerConfig`` from ``options["torchair"]``, our passes registered on it."""
    unknown = sorted(set(settings) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown options['torchair'] key(s) {unknown}; known: {sorted(CONFIG_KEYS)}")
    mode = settings.get("mode", DEFAULT_MODE)
    if mode not in MODES:
        raise ConfigError(f"options['torchair']['mode'] must be one of {list(MODES)}, got {mode!r}")
    config = torchair.CompilerConfig()
    for key, value in dict(settings, mode=mode).items():
        *path, leaf = CONFIG_KEYS[key].split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    if pipeline is not None:
        if not hasattr(config, "post_grad_custom_post_pass"):
            raise ConfigError(_NO_PASS_HOOK.format(what="has no post_grad_custom_post_pass"))
        user_pass = config.post_grad_custom_post_pass
        user_pass = getattr(user_pass, "value", user_pass)  # torchair keeps options as OptionValues

        def ascend_compile_pass(gm, example_inputs, cfg):
            if user_pass is not None:
                user_pass(gm, example_inputs, cfg)
            pipeline(gm)
            if mode == "max-autotune":
                check_converters(gm)

        try:
            config.post_grad_custom_post_pass = ascend_compile_pass
        except Exception as e:  # noqa: BLE001 - a config that refuses the hook
            raise ConfigError(_NO_PASS_HOOK.format(what=f"refused post_grad_custom_post_pass ({e})")) from e
    return config


def check_converters(gm) -> None:
    """GE (``max-autotune``) converts every op of the graph or fails: name the ops without a converter in
    this torchair (vLLM-Ascend's attention ops are Python custom ops with none) before GE does."""
    import operator

    try:
        from torchair._ge_concrete_graph import fx2ge_converter
    except ImportError:
        return  # no registry to read: GE's own error
    registry = getattr(fx2ge_converter, "_CONVERTERS", None)
    if registry is None:
        return
    missing = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                      and n.target is not operator.getitem and registry.get(n.target) is None})
    if missing:
        raise ConfigError(
            f"torchair's GE graph mode (max-autotune) needs a converter for every op, and this torchair has none for "
            f"{missing}: compile with options={{'torchair': {{'mode': 'reduce-overhead'}}}} (ACL graph capture, which "
            "runs the ops as they are), or register GE converters for them."
        )


_NO_PASS_HOOK = (
    "this torchair's CompilerConfig {what}: ascend_compile's passes (broadcast rewrite, prefetch schedule, "
    "stream order) run inside torchair through that hook, and without them every shared weight would be fetched "
    "by a synchronous broadcast at its use. Use a torchair whose CompilerConfig has post_grad_custom_post_pass "
    "(it comes with torch_npu), or lower with options={{'lowering': 'aot_eager'}}."
)


def compile(gm, example_inputs, pipeline, options):
    torchair = import_torchair()
    register_converters(torchair)
    backend = torchair.get_npu_backend(compiler_config=compiler_config(torchair, options.torchair, pipeline))
    compiled = backend(gm, example_inputs)
    if pipeline is None or pipeline.runs:
        return compiled
    return _PassesChecked(compiled, pipeline)  # torchair compiles at the first call: check after it


class _PassesChecked:
    """A torchair graph compiled at its first call: after that call, our passes must have run in it.
    Every rank has the same torchair, so every rank raises at the same call."""

    def __init__(self, compiled, pipeline):
        self.compiled, self.pipeline, self.checked = compiled, pipeline, False

    def __call__(self, *args):
        out = self.compiled(*args)
        if not self.checked:
            if not self.pipeline.runs:
                raise ConfigError(_NO_PASS_HOOK.format(what="took post_grad_custom_post_pass but never called it"))
            self.checked = True
        return out


def register_converters(torchair) -> None:
    """A GE converter for the marker op, for graphs compiled by torchair without our backend.

    Our backend never lets the marker reach GE (it is rewritten first); a sharded model
    compiled with ``backend=torchair.get_npu_backend(...)`` directly would, and GE fails on
    ops without a converter. The marker converts like the functional broadcast it stands
    for (HcomBroadcast from the owner), through torchair's own converter for that op.
    """
    import torch

    from ..runtime.ops import shared_weight_targets

    try:
        from torchair._ge_concrete_graph import fx2ge_converter
    except ImportError:
        return  # a torchair without the converter registry: the backend path still works
    marker = shared_weight_targets()[1]
    registry = getattr(fx2ge_converter, "_CONVERTERS", {})
    if marker in registry:
        return
    broadcast = torch.ops._c10d_functional.broadcast.default

    @torchair.register_fx_node_ge_converter(marker)
    # torchair binds a converter's parameters by the op's schema, so they are spelled out here
    # (tests/test_layout.py holds them equal to ``Marker``'s fields)
    def convert_shared_weight(w, series, index, owner, group_name, prefetch_step, wrap_windows=0, layers=0,
                              generation=0, meta_outputs=None):
        converter = _broadcast_converter(fx2ge_converter, broadcast)
        return converter(w, owner, group_name, meta_outputs=meta_outputs)

    @torchair.register_fx_node_ge_converter(torch.ops.ascend_compile.receive_buffer.default)
    def convert_receive_buffer(size, dtype, device, npu_format, meta_outputs=None):
        """A receive buffer in the owner's format: torchair's own ``npu.empty_with_format``."""
        converter = _empty_with_format_converter(fx2ge_converter)
        return converter(size, dtype=dtype, device=device, acl_format=npu_format, meta_outputs=meta_outputs)


def _empty_with_format_converter(fx2ge_converter):
    import torch

    registry = getattr(fx2ge_converter, "_CONVERTERS", {})
    op = getattr(getattr(getattr(torch.ops, "npu", None), "empty_with_format", None), "default", None)
    found = registry.get(op) if op is not None else None
    if found is None:
        raise RuntimeError(
            "a shared weight is stored in FRACTAL_NZ, and this torchair has no converter for npu.empty_with_format "
            "(its receive buffer in a GE graph): use a torchair that has one, leave that series out, or keep the "
            "weight in ND (VLLM_ASCEND_ENABLE_NZ=0 for unquantized layers)."
        )
    return getattr(found, "_converter", found)


def _broadcast_converter(fx2ge_converter, op):
    registry = getattr(fx2ge_converter, "_CONVERTERS", {})
    found = registry.get(op)
    if found is None:
        raise RuntimeError(
            "this torchair has no converter for _c10d_functional.broadcast, so the shared_weight marker "
            "cannot be lowered directly; compile with backend='ascend_compile' (options={'lowering': 'torchair'})"
        )
    return getattr(found, "_converter", found)
