"""A stand-in for torch_npu + torchair that records what it is given and runs graphs on CPU.

``install()`` puts modules named ``torch_npu`` and ``torchair`` into ``sys.modules`` and
defines ``torch.ops.air`` (``scope_enter``, ``scope_exit``, ``record``, ``wait``) with the
schemas torchair gives them. ``get_npu_backend`` runs AOTAutograd like the real one, calls the
config's ``post_grad_custom_post_pass(gm, example_inputs, config)`` on the aten graph, records
that graph in ``RECORDED`` and runs it op by op with ``StreamChecker``, so a test can check both
what GE would have been handed and the numbers.

In ``reduce-overhead`` (npugraph_ex) mode a graph is captured at its first call and replayed after
(``_AclGraph``, with ``tests/capture_standin.py``): what the capture refuses, it refuses.

``StreamChecker`` runs the graph as the NPU would order it on its streams and raises
``StreamOrderError`` where the device would go wrong or torchair would refuse: a stream scope
(``scope_enter(["_user_stream_label", ...], [label, ...])`` ... ``scope_exit()``) that is not
closed, or closed twice; an ``air.wait`` on anything but an event token that an ``air.record``
of this same graph run returned (no token, one from another graph or an earlier run, a plain
tensor); and a read of a collective's result on another stream than the one that issued it
without an ``air.wait`` on an event recorded after the collective on its stream (a missing or
misplaced record/wait: on the device the read could overtake the transfer).
"""

from __future__ import annotations

import sys
import types

import torch

RECORDED: list = []  # {"config": CompilerConfig, "graph": GraphModule} per compiled graph
_LIB = None
COMPUTE = "<compute stream>"  # the stream outside every scope
STREAM_LABEL_KEY = "_user_stream_label"
COLLECTIVES = ("broadcast", "broadcast_", "all_reduce", "all_reduce_", "all_gather_into_tensor", "reduce_scatter_tensor")


class StreamOrderError(RuntimeError):
    """What the fake refuses: see the module docstring."""


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
    # kernels for the ops run outside StreamChecker (which handles them itself): nothing to check there
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


class StreamChecker(torch.fx.Interpreter):
    """Runs a graph node by node, tracking streams and events (see the module docstring).

    Each stream keeps a vector clock: its own count of collectives issued on it, and for every
    other stream the count it has waited for through events. ``record`` snapshots the clock of its
    stream into a fresh token; ``wait`` merges the tokens' snapshots into the waiting stream."""

    def run(self, *args, **kwargs):
        air, c10d = torch.ops.air, torch.ops._c10d_functional
        self._ops = {air.scope_enter.default: self._scope_enter, air.scope_exit.default: self._scope_exit,
                     air.record.default: self._record, air.wait.default: self._wait}
        self._collectives = {getattr(c10d, name).default for name in COLLECTIVES if hasattr(c10d, name)}
        self.scopes: list = []
        self.clocks: dict = {COMPUTE: {COMPUTE: 0}}
        self.tokens: dict = {}  # id(token) -> (token, stream, clock snapshot); the token is kept alive
        self.issued: dict = {}  # id(collective result) -> (result, stream, its count on that stream)
        out = super().run(*args, **kwargs)
        if self.scopes:
            raise StreamOrderError(f"the graph ends inside stream scope(s) {self.scopes}: scope_enter without scope_exit")
        return out

    def _stream(self) -> str:
        return self.scopes[-1] if self.scopes else COMPUTE

    def _clock(self) -> dict:
        return self.clocks.setdefault(self._stream(), {self._stream(): 0})

    def run_node(self, n):
        if n.op != "call_function":
            return super().run_node(n)
        if n.target in self._ops:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return self._ops[n.target](n, *args, **kwargs)
        self._check_reads(n)
        out = super().run_node(n)
        if n.target in self._collectives:
            clock = self._clock()
            clock[self._stream()] += 1
            for t in out if isinstance(out, (list, tuple)) else [out]:
                self.issued[id(t)] = (t, self._stream(), clock[self._stream()])
        return out

    def _check_reads(self, n) -> None:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        here, clock = self._stream(), self._clock()
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            hit = self.issued.get(id(t)) if isinstance(t, torch.Tensor) else None
            if hit is None or hit[1] == here:
                continue
            _, stream, count = hit
            if clock.get(stream, 0) < count:
                raise StreamOrderError(
                    f"{n.format_node()}: reads the result of a collective issued on stream {stream!r}, but stream "
                    f"{here!r} waited on no event recorded there after it: the read may overtake the transfer")

    def _scope_enter(self, n, keys, values, need_execute=False):
        if len(keys) != len(values) or STREAM_LABEL_KEY not in keys:
            raise StreamOrderError(f"{n.format_node()}: scope_enter needs {STREAM_LABEL_KEY!r} and a value per key")
        self.scopes.append(str(values[list(keys).index(STREAM_LABEL_KEY)]))

    def _scope_exit(self, n, need_execute=False):
        if not self.scopes:
            raise StreamOrderError(f"{n.format_node()}: scope_exit outside any stream scope")
        self.scopes.pop()

    def _record(self, n, device=None):
        token = torch.empty(0)
        self.tokens[id(token)] = (token, self._stream(), dict(self._clock()))
        return token

    def _wait(self, n, x):
        clock = self._clock()
        for t in x:
            hit = self.tokens.get(id(t))
            if hit is None or hit[0] is not t:
                raise StreamOrderError(f"{n.format_node()}: waits on a tensor that no air.record of this graph run "
                                       "returned (an event never recorded, or one from another graph or run)")
            for stream, count in hit[2].items():
                clock[stream] = max(clock.get(stream, 0), count)


class OptionValue:
    """torchair's ``configs/_option_base.py`` OptionValue: a value checked against its allowed ones."""

    def __init__(self, default, optional=None):
        self.optional = optional
        self.value = default

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        if self.optional is not None and v is not None and v not in self.optional:
            raise ValueError(f"value {v!r} not in {self.optional}")
        self._value = v


class CallableValue(OptionValue):
    @OptionValue.value.setter
    def value(self, v):
        if v is not None and not callable(v):
            raise ValueError(f"{v!r} is not callable")
        self._value = v


class NpuBaseConfig:
    """torchair's NpuBaseConfig: after ``__init__`` the option names are fixed; setting another
    raises ``ValueError`` ("... has no option ..."), setting an option sets its ``value``."""

    def _fix(self):
        fixed = [k for k, v in vars(self).items() if isinstance(v, (OptionValue, NpuBaseConfig))]
        object.__setattr__(self, "_fixed_attrs", fixed)

    def __setattr__(self, key, value):
        if hasattr(self, "_fixed_attrs"):
            if key not in self._fixed_attrs:
                raise ValueError(f"{type(self).__name__} has no option {key}")
            if isinstance(getattr(self, key), OptionValue):
                getattr(self, key).value = value
                return
        object.__setattr__(self, key, value)


def _config(name, **options):
    cfg = type(name, (NpuBaseConfig,), {})()
    for k, v in options.items():
        setattr(cfg, k, v)
    cfg._fix()
    return cfg


class CompilerConfig(NpuBaseConfig):
    """The options of torchair's ``configs/compiler_config.py`` this project sets or reads (master, 2026-06)."""

    def __init__(self):
        self.mode = OptionValue("max-autotune", ["max-autotune", "reduce-overhead", "npugraph_ex"])
        self.debug = _config("_DebugConfig",
                             graph_dump=_config("_Dump", type=OptionValue(None, ["txt", "pbtxt", "py"]),
                                                path=OptionValue(None)),
                             run_eagerly=OptionValue(False, [True, False]),
                             aclgraph=_config("_AclGraphDebugConfig", clone_input=OptionValue(True, [True, False])))
        self.experimental_config = _config(
            "_ExperimentalConfig", frozen_parameter=OptionValue(False, [True, False]),
            keep_inference_input_mutations=OptionValue(True, [True, False]),
            tiling_schedule_optimize=OptionValue(False, [True, False]), static_model_ops_lower_limit=OptionValue(None))
        self.post_grad_custom_pre_pass = CallableValue(None)
        self.post_grad_custom_post_pass = CallableValue(None)
        self._fix()


class _Converters(dict):
    """torchair's converter registry: aten, prims, c10d functional, air and npu ops convert (torchair
    ships converters for them); any other op only where one was registered."""

    NAMESPACES = ("aten", "prims", "_c10d_functional", "air", "npu")

    def get(self, op, default=None):
        if dict.__contains__(self, op):
            return dict.__getitem__(self, op)
        namespace = getattr(op, "namespace", None) or str(op).split(".")[0]
        return (lambda *a, **k: None) if namespace in self.NAMESPACES else default

    def __contains__(self, op):
        return self.get(op) is not None


class ConverterMissing(RuntimeError):
    """What GE (``max-autotune``) refuses: an op with no converter."""


def _check_converters(gm, registry) -> None:
    import operator

    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is not operator.getitem and n.target not in registry:
            raise ConverterMissing(f"No converter registered for {n.target} (fake torchair, max-autotune)")


class _AclGraph:
    """``reduce-overhead``/npugraph_ex: the graph is captured at its first call for each input shape
    (``tests/capture_standin.py``: a host sync inside it is refused), then every call copies its
    inputs into the captured ones (``debug.aclgraph.clone_input``) and replays the captured ops,
    running no Python of the graph's ops again."""

    def __init__(self, gm):
        self.gm, self.captured, self.replays = gm, {}, 0

    def __call__(self, *args):
        from capture_standin import Capture

        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        graph = self.captured.get(key)
        if graph is None:
            static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            graph = self.captured[key] = Capture(lambda *a: StreamChecker(self.gm).run(*a), *static)
        else:
            for s, a in zip(graph.inputs, args):
                if isinstance(a, torch.Tensor):
                    s.copy_(a)
            graph.replay()
            self.replays += 1
        out = graph.output
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in out] if isinstance(out, (list, tuple)) \
            else out.clone()


def get_npu_backend(compiler_config=None):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    config = compiler_config or CompilerConfig()

    def fw_compiler(gm, example_inputs):
        if config.post_grad_custom_post_pass.value is not None:
            config.post_grad_custom_post_pass.value(gm, example_inputs, config)
        if config.mode.value == "max-autotune":  # a GE graph: every op needs a converter
            _check_converters(gm, sys.modules["torchair._ge_concrete_graph.fx2ge_converter"]._CONVERTERS)
        RECORDED.append({"config": config, "graph": gm})
        if config.mode.value in ("reduce-overhead", "npugraph_ex"):  # an ACL graph: captured, then replayed
            RECORDED[-1]["acl_graph"] = _AclGraph(gm)
            return make_boxed_func(RECORDED[-1]["acl_graph"])
        return make_boxed_func(lambda *args: StreamChecker(gm).run(*args))

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
    converters._CONVERTERS = _Converters()

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
