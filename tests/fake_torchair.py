"""A stand-in for torch_npu + torchair that records what it is given and runs graphs on CPU.

``install()`` puts modules named ``torch_npu`` and ``torchair`` into ``sys.modules`` and
defines ``torch.ops.air`` (``scope_enter``, ``scope_exit``, ``record``, ``wait``) with the
schemas torchair gives them and no-op CPU kernels. ``get_npu_backend`` runs AOTAutograd
like the real one, calls the config's ``post_grad_custom_post_pass(gm, example_inputs,
config)`` on the aten graph, records that graph in ``RECORDED`` and runs it op by op, so a
test can check both what GE would have been handed and the numbers.
"""

from __future__ import annotations

import sys
import types

import torch

RECORDED: list = []  # {"config": CompilerConfig, "graph": GraphModule} per compiled graph
_LIB = None


def _define_air_ops() -> None:
    global _LIB
    if _LIB is not None:
        return
    _LIB = torch.library.Library("air", "DEF")
    # the schemas of torchair's scope/_scope.py and ops/_record_wait.py
    _LIB.define("scope_enter(str[] keys, str[] values, bool need_execute=False) -> ()")
    _LIB.define("scope_exit(bool need_execute=False) -> ()")
    _LIB.define("record(*, Device? device=None) -> Tensor")
    _LIB.define("wait(Tensor[] x) -> ()")
    for name, fn in {
        "scope_enter": lambda keys, values, need_execute=False: None,
        "scope_exit": lambda need_execute=False: None,
        "record": lambda device=None: torch.empty(0),
        "wait": lambda x: None,
    }.items():
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
    for name in ("scope_enter", "scope_exit", "wait"):
        torch.fx.node.has_side_effect(getattr(torch.ops.air, name).default)
    torch.fx.node.has_side_effect(torch.ops.air.record.default)

    @torch.library.register_fake("air::record", lib=_LIB)
    def _(device=None):
        return torch.empty(0)


class _Namespace:
    pass


class CompilerConfig:
    def __init__(self):
        self.mode = "max-autotune"
        self.debug = _Namespace()
        self.debug.graph_dump = _Namespace()
        self.debug.graph_dump.type = None
        self.debug.graph_dump.path = None
        self.debug.aclgraph = _Namespace()
        self.debug.aclgraph.clone_input = True
        self.experimental_config = _Namespace()
        self.experimental_config.frozen_parameter = False
        self.experimental_config.keep_inference_input_mutations = False
        self.experimental_config.tiling_schedule_optimize = False
        self.experimental_config.static_model_ops_lower_limit = None
        self.post_grad_custom_pre_pass = None
        self.post_grad_custom_post_pass = None


def get_npu_backend(compiler_config=None):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    config = compiler_config or CompilerConfig()

    def fw_compiler(gm, example_inputs):
        if config.post_grad_custom_post_pass is not None:
            config.post_grad_custom_post_pass(gm, example_inputs, config)
        RECORDED.append({"config": config, "graph": gm})
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=fw_compiler)


def install() -> types.ModuleType:
    """Make ``import torch_npu`` and ``import torchair`` give the fakes (idempotent)."""
    _define_air_ops()
    if "torchair" in sys.modules and getattr(sys.modules["torchair"], "IS_FAKE", False):
        return sys.modules["torchair"]
    sys.modules["torch_npu"] = types.ModuleType("torch_npu")
    air = types.ModuleType("torchair")
    air.IS_FAKE = True
    air.CompilerConfig = CompilerConfig
    air.get_npu_backend = get_npu_backend
    converters = types.ModuleType("torchair._ge_concrete_graph.fx2ge_converter")
    converters._CONVERTERS = {}

    def register_fx_node_ge_converter(op):
        def register(fn):
            converters._CONVERTERS[op] = fn
            return fn
        return register

    air.register_fx_node_ge_converter = register_fx_node_ge_converter
    concrete = types.ModuleType("torchair._ge_concrete_graph")
    concrete.fx2ge_converter = converters
    air._ge_concrete_graph = concrete
    sys.modules.update({
        "torchair": air, "torchair._ge_concrete_graph": concrete,
        "torchair._ge_concrete_graph.fx2ge_converter": converters,
    })
    return air


def uninstall() -> None:
    for name in ("torch_npu", "torchair", "torchair._ge_concrete_graph", "torchair._ge_concrete_graph.fx2ge_converter"):
        sys.modules.pop(name, None)
    RECORDED.clear()
