"""The torchair lowering against a fake torchair: config, the graph handed over, errors, lazy imports."""

import subprocess
import sys

import pytest
import torch

import ascend_compile as ac
import fake_torchair
from ascend_compile.config import ConfigError
from ascend_compile.lowering import torchair as lowering
from ascend_compile.models import StackShape, build_stack, make_input
from ranks import run_ranks


def test_importing_the_project_never_touches_the_npu_stack():
    code = ("import sys, torch, ascend_compile, ascend_compile.backend, ascend_compile.lowering.torchair; "
            "assert 'torch_npu' not in sys.modules and 'torchair' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_compiler_config_carries_the_options():
    air = fake_torchair.install()
    try:
        cfg = lowering.compiler_config(air, {"mode": "reduce-overhead", "graph_dump_type": "pbtxt",
                                             "graph_dump_path": "/tmp/ge", "frozen_parameter": True})
        assert cfg.mode.value == "reduce-overhead"  # torchair keeps options as OptionValues
        assert (cfg.debug.graph_dump.type.value, cfg.debug.graph_dump.path.value) == ("pbtxt", "/tmp/ge")
        assert cfg.experimental_config.frozen_parameter.value is True
        assert cfg.post_grad_custom_post_pass.value is None  # nothing to run without shared weights
        assert lowering.compiler_config(air, {}).mode.value == "reduce-overhead"  # capture by default; GE when asked
        with pytest.raises(ConfigError, match=r"unknown options\['torchair'\] key\(s\) \['frozen'\]"):
            lowering.compiler_config(air, {"frozen": True})
        with pytest.raises(ConfigError, match="must be one of \\['max-autotune', 'reduce-overhead'\\]"):
            lowering.compiler_config(air, {"mode": "fast"})
    finally:
        fake_torchair.uninstall()


def test_missing_npu_stack_is_a_clear_error():
    torch._dynamo.reset()
    model, x = build_stack(StackShape(layers=1)), make_input(StackShape(layers=1))
    with pytest.raises(Exception, match=r"lowering='torchair' needs torch_npu with CANN.*use options=\{'lowering': 'inductor'\}"):
        torch.compile(model, backend="ascend_compile", options={"lowering": "torchair"})(x)


def test_marker_converter_delegates_to_the_broadcast_converter():
    air = fake_torchair.install()
    try:
        calls = []
        registry = sys.modules["torchair._ge_concrete_graph.fx2ge_converter"]._CONVERTERS
        registry[torch.ops._c10d_functional.broadcast.default] = lambda *a, **k: calls.append((a, k)) or "ge_tensor"
        lowering.register_converters(air)
        convert = registry[torch.ops.ascend_compile.shared_weight.default]
        assert convert("w", "o_proj.weight", 3, 1, "grp", 1, meta_outputs="m") == "ge_tensor"
        assert calls == [(("w", 1, "grp"), {"meta_outputs": "m"})]  # HcomBroadcast from the owner's group rank
    finally:
        fake_torchair.uninstall()


def _torchair_case(rank, world, k):
    fake_torchair.install()
    try:
        torch._dynamo.reset()
        shape = StackShape(layers=4)
        x = make_input(shape)
        ref = build_stack(shape)(x)
        model = build_stack(shape)
        ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj", "q_b_proj"], prefetch_step=k))
        out = torch.compile(model, backend="ascend_compile", fullgraph=True,
                            options={"lowering": "torchair", "torchair": {"mode": "max-autotune", "frozen_parameter": True}})(x)
        (rec,) = fake_torchair.RECORDED
        ops = []
        for n in rec["graph"].graph.nodes:
            if n.op == "call_function":
                name = str(n.target)
                if n.target is torch.ops.air.scope_enter.default:
                    name += ":" + n.args[1][0]
                ops.append(name)
        return {"equal": torch.equal(out, ref), "ops": ops, "frozen": rec["config"].experimental_config.frozen_parameter.value}
    finally:
        fake_torchair.uninstall()


@pytest.mark.parametrize("k", [0, 1])
def test_graph_handed_to_torchair(k):
    results = run_ranks(_torchair_case, 2, k)
    for r in results:
        assert r["equal"]  # the fake runs the handed-over graph on CPU: same numbers as unsharded
        assert r["frozen"] is True
        ops = r["ops"]
        assert not any("ascend_compile.shared_weight" in o for o in ops)
        assert not any(o.startswith("aten.set_") for o in ops)
        assert ops.count("_c10d_functional.broadcast.default") == 8  # functional: torchair converts it
        # no window op: a GE graph run or an aclgraph replay cannot leave a broadcast in flight for the
        # next one (wrap-around is off by default where torch_npu imports, and refused: see below)
        assert not any("ascend_compile.window_" in o for o in ops)
        assert ops.count("_c10d_functional.broadcast_.default") == 0
        # every broadcast inside a scope on our stream, a record after it, waited for before its wait
        for i, o in enumerate(ops):
            if o == "_c10d_functional.broadcast.default":
                before = [p for p in ops[:i] if p.startswith("air.scope")][-1]
                assert before == "air.scope_enter.default:ascend_compile_bcast"
                assert ops[i + 1:i + 3] == ["air.record.default", "air.scope_exit.default"]
            if o == "_c10d_functional.wait_tensor.default":
                assert ops[i - 1] == "air.wait.default"
        assert ops.count("air.scope_enter.default:ascend_compile_bcast") == ops.count("air.scope_exit.default") == 8
    # functional broadcasts: owners and receivers run the same ops, so the same collectives and
    # events in the same order on every rank
    assert results[0]["ops"] == results[1]["ops"]


def _torchair_wrap_case(rank, world):
    fake_torchair.install()
    try:
        torch._dynamo.reset()
        shape = StackShape(layers=4)
        model = build_stack(shape)
        ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1, wrap_around=True))
        try:
            torch.compile(model, backend="ascend_compile", fullgraph=True, options={"lowering": "torchair"})(
                make_input(shape))
        except Exception as e:  # Dynamo wraps what a backend raises
            return str(e)
        return "no error"
    finally:
        fake_torchair.uninstall()


def test_torchair_refuses_a_model_sharded_with_wrap_around():
    for msg in run_ranks(_torchair_wrap_case, 2):
        assert "the torchair lowering has no wrap-around prefetch" in msg, msg
        assert "SharedWeightConfig(wrap_around=False)" in msg, msg


def _stream_checker_case(rank, world):
    import torch.distributed as dist
    from torch import fx

    fake_torchair.install()
    try:
        air, c10d = torch.ops.air, torch.ops._c10d_functional

        def graph(variant):  # a broadcast on a side stream, its event, the compute stream's wait, its read
            g = fx.Graph()
            w, foreign = g.placeholder("w"), g.placeholder("foreign")
            g.call_function(air.scope_enter.default, (["_user_stream_label", "_user_stream_priority"], ["s", "0"]))
            early = g.call_function(air.record.default, ()) if variant == "record before the broadcast" else None
            out = g.call_function(c10d.broadcast.default, (w, 0, dist.group.WORLD.group_name))
            done = g.call_function(air.record.default, ())
            if variant != "no scope_exit":
                g.call_function(air.scope_exit.default, ())
            if variant != "no wait":
                token = {"record before the broadcast": early, "a token from elsewhere": foreign}.get(variant, done)
                g.call_function(air.wait.default, ([token],))
            g.output(g.call_function(c10d.wait_tensor.default, (out,)))
            return fx.GraphModule(torch.nn.Module(), g)

        said = {}
        for variant in ("right", "no wait", "record before the broadcast", "a token from elsewhere", "no scope_exit"):
            try:  # every rank runs the same variants: the broadcasts pair
                got = fake_torchair.StreamChecker(graph(variant)).run(torch.full((4,), float(rank)), torch.empty(0))
                said[variant] = got.tolist()
            except fake_torchair.StreamOrderError as e:
                said[variant] = str(e)
        return said
    finally:
        fake_torchair.uninstall()


def test_the_fake_refuses_what_the_npu_would_get_wrong():
    for said in run_ranks(_stream_checker_case, 2):
        assert said["right"] == [0.0] * 4  # rank 0's values on every rank
        assert "waited on no event recorded there after it" in said["no wait"]
        assert "waited on no event recorded there after it" in said["record before the broadcast"]
        assert "waits on a tensor that no air.record of this graph run returned" in said["a token from elsewhere"]
        assert "scope_enter without scope_exit" in said["no scope_exit"]


def test_the_fake_config_refuses_what_torchairs_config_refuses():
    """torchair's CompilerConfig (NpuBaseConfig) refuses options it does not have and values outside an
    option's choices; the fake does too, so a lowering that set an attribute torchair ignores fails here."""
    air = fake_torchair.install()
    try:
        cfg = air.CompilerConfig()
        with pytest.raises(ValueError, match="CompilerConfig has no option post_grad_pass"):
            cfg.post_grad_pass = lambda *a: None
        with pytest.raises(ValueError, match="has no option clone_inputs"):
            cfg.debug.aclgraph.clone_inputs = False
        with pytest.raises(ValueError, match="not in"):
            cfg.mode = "fast"
        with pytest.raises(ValueError, match="is not callable"):
            cfg.post_grad_custom_post_pass = "not a function"
    finally:
        fake_torchair.uninstall()


def test_a_torchair_without_the_pass_hook_is_refused():
    """torchair before 7.3 (commit 25fbad12) has no post_grad_custom_post_pass: our passes could not run."""
    air = fake_torchair.install()
    try:
        class OldConfig(fake_torchair.NpuBaseConfig):
            def __init__(self):
                self.mode = fake_torchair.OptionValue("max-autotune", ["max-autotune", "reduce-overhead"])
                self._fix()

        air.CompilerConfig = OldConfig
        with pytest.raises(ConfigError, match="CompilerConfig has no post_grad_custom_post_pass: ascend_compile's passes"):
            lowering.compiler_config(air, {}, pipeline=lambda gm: gm)
        assert lowering.compiler_config(air, {}).mode.value == "reduce-overhead"  # nothing to register: fine
    finally:
        fake_torchair.uninstall()


def test_passes_torchair_never_ran_are_an_error():
    class Pipeline:
        runs = 0

    pipeline = Pipeline()
    checked = lowering._PassesChecked(lambda x: x + 1, pipeline)
    with pytest.raises(ConfigError, match="took post_grad_custom_post_pass but never called it"):
        checked(1)
    pipeline.runs = 1
    assert checked(1) == 2 and checked(2) == 3


@torch.library.custom_op("ascend_compile_test::attention", mutates_args=())
def _attention(x: torch.Tensor) -> torch.Tensor:
    """A Python custom op with no GE converter, as vLLM-Ascend 0.23's attention ops are."""
    return torch.tanh(x)


@_attention.register_fake
def _(x):
    return torch.empty_like(x)


class _WithAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = build_stack(StackShape(layers=2))

    def forward(self, x):
        return self.stack(torch.ops.ascend_compile_test.attention(x))


def _converter_case(rank, world, mode):
    fake_torchair.install()
    try:
        torch._dynamo.reset()
        ref, model = _WithAttention(), _WithAttention()
        ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1, wrap_around=False))
        x = make_input(StackShape(layers=2))
        compiled = torch.compile(model, backend="ascend_compile", options={"lowering": "torchair",
                                                                            "torchair": {"mode": mode}})
        try:
            out = compiled(x)
        except Exception as e:  # noqa: BLE001 - the message is checked
            return str(e)
        x2 = make_input(StackShape(layers=2), seed=5)  # captured at the first call, replayed on new inputs
        replayed = torch.equal(compiled(x2), ref(x2)) and fake_torchair.RECORDED[-1]["acl_graph"].replays == 1
        return torch.equal(out, ref(x)) and replayed
    finally:
        fake_torchair.uninstall()


def test_ge_mode_names_the_op_without_a_converter_and_capture_mode_runs_it():
    for said in run_ranks(_converter_case, 2, "max-autotune"):
        assert "needs a converter for every op, and this torchair has none for ['ascend_compile_test.attention.default']" \
            in said, said
        assert "options={'torchair': {'mode': 'reduce-overhead'}}" in said
    assert run_ranks(_converter_case, 2, "reduce-overhead") == [True, True]


def test_the_fake_ge_refuses_an_op_without_a_converter():
    air = fake_torchair.install()
    try:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"No converter registered for ascend_compile_test.attention.default"):
            torch.compile(_WithAttention(), backend=air.get_npu_backend())(make_input(StackShape(layers=2)))
        torch._dynamo.reset()
        config = air.CompilerConfig()
        config.mode = "reduce-overhead"  # captured, not converted: runs
        torch.compile(_WithAttention(), backend=air.get_npu_backend(compiler_config=config))(make_input(StackShape(layers=2)))
    finally:
        fake_torchair.uninstall()


@torch.library.custom_op("ascend_compile_test::syncing", mutates_args=())
def _syncing(x: torch.Tensor) -> torch.Tensor:
    """A Python custom op that reads a device value on the host: ACL graph capture refuses it."""
    return x * float(x.abs().max().item())


@_syncing.register_fake
def _(x):
    return torch.empty_like(x)


def test_the_fake_acl_graph_captures_once_replays_after_and_refuses_a_host_sync():
    air = fake_torchair.install()
    try:
        from capture_standin import CaptureError

        torch._dynamo.reset()
        config = air.CompilerConfig()
        config.mode = "reduce-overhead"
        model = _WithAttention()
        compiled = torch.compile(model, backend=air.get_npu_backend(compiler_config=config), dynamic=False)
        x1, x2 = make_input(StackShape(layers=2), seed=1), make_input(StackShape(layers=2), seed=2)
        assert torch.equal(compiled(x1), model(x1))
        (rec,) = fake_torchair.RECORDED
        assert torch.equal(compiled(x2), model(x2)) and rec["acl_graph"].replays == 1  # replayed on the new input
        torch._dynamo.reset()
        with pytest.raises(CaptureError, match=r"aten\.item\.default reads a device value on the host"):
            torch.compile(lambda x: torch.ops.ascend_compile_test.syncing(x) + 1,
                          backend=air.get_npu_backend(compiler_config=config))(x1)
    finally:
        fake_torchair.uninstall()
