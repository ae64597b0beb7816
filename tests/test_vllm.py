"""vLLM integration on CPU gloo ranks: real LinearBase layers, config keys, the plugin."""

import os

import re

import pytest
import torch

import ascend_compile as ac
from ascend_compile.config import ConfigError
from ranks import run_ranks

# vLLM is not an extra of ours (its wheels pin torch): scripts/install.sh builds .venv-vllm, where
# scripts/test.sh runs these files; there a missing vLLM fails, never skips
import vllm  # noqa: E402,F401

SERIES = ["q_b_proj", "o_proj", "qkv_proj", "gate_up_proj", "down_proj", "q_a_proj"]


def _vllm_layers_case(rank, world, lowering):
    import vllm_model

    cfg, ctx = vllm_model.setup_vllm(rank, world)
    try:
        torch._dynamo.reset()
        positions, x = vllm_model.inputs()
        ref_model = vllm_model.build()
        ref = ref_model(positions, x)
        ref_compiled = torch.compile(ref_model, backend="inductor")(positions, x) if lowering == "inductor" else ref
        model = vllm_model.build()
        before = ac.parameter_storage_bytes(model)
        plan = ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1))
        saved = before - ac.parameter_storage_bytes(model)
        eager = model(positions, x)
        explain = torch._dynamo.explain(model)(positions, x)
        out = torch.compile(model, backend="ascend_compile", fullgraph=True, options={"lowering": lowering})(positions, x)
        kinds = sorted({type(m).__name__.replace("Parametrized", "") for n, m in model.named_modules()
                        if n.endswith(tuple(SERIES))})
        return {"eager": torch.equal(eager, ref), "diff": float((out - ref_compiled).abs().max()),
                "bitwise": torch.equal(out, ref_compiled), "breaks": explain.graph_break_count,
                "saved": saved, "planned": plan.saved_bytes(), "kinds": kinds}
    finally:
        ctx.__exit__(None, None, None)


# aot_eager: bitwise with eager; Inductor runs vLLM's layers in every engine test (mode 2, the default lowering)
@pytest.mark.parametrize("lowering", ["aot_eager"])
def test_real_vllm_layers(lowering):
    for r in run_ranks(_vllm_layers_case, 2, lowering):
        assert r["kinds"] == ["ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
                              "ReplicatedLinear", "RowParallelLinear"]
        assert r["eager"], "sharded vLLM model differs from the unsharded one eagerly"
        assert r["breaks"] == 0
        assert r["diff"] <= 1e-5, r["diff"]
        if lowering == "aot_eager":
            assert r["bitwise"]
        assert abs(r["saved"] - r["planned"]) < 0.01 * r["planned"]


class _Cfg:
    def __init__(self, additional, mode=2, backend="ascend_compile", tp=1, pp=1, dp=2,
                 launcher="external_launcher", moe=False, enforce_eager=False):
        from types import SimpleNamespace

        self.additional_config = additional
        self.compilation_config = SimpleNamespace(mode=mode, backend=backend, debug_dump_path=None,
                                                  cudagraph_mode=None)
        self.parallel_config = SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                               data_parallel_size=dp, distributed_executor_backend=launcher)
        self.model_config = SimpleNamespace(is_moe=moe, enforce_eager=enforce_eager)


def test_parallel_layouts_that_would_be_wrong_or_hang_are_refused():
    from ascend_compile.integrations import vllm as integ

    def sw(group=None):
        cfg = {"shared_weight": {"layers": ["o_proj"]}}
        return {"ascend_compile": dict(cfg, **({"group": group} if group else {}))}

    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 with shared weights over group 'world'.*"
                                          r"wrong results.*\['group'\] = 'dp'"):
        integ.check_config(_Cfg(sw(), tp=2, dp=2))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 .* group 'tp'"):
        integ.check_config(_Cfg(sw("tp"), tp=2, dp=2))
    with pytest.raises(ConfigError, match=r"pipeline_parallel_size=2 .* pipeline stages hold different layers"):
        integ.check_config(_Cfg(sw(), pp=2, dp=2))
    with pytest.raises(ConfigError, match=r"need 2 or more ranks in it: data_parallel_size=1, tensor_parallel_size=2"):
        integ.check_config(_Cfg(sw("dp"), tp=2, dp=1))  # TP=2, DP=1: nothing holds the same shard
    with pytest.raises(ConfigError, match=r"multi-process engine.*would wait forever.*external_launcher"):
        integ.check_config(_Cfg(sw(), dp=2, launcher="mp"))
    integ.check_config(_Cfg(sw(), dp=2, launcher="mp", moe=True))  # MoE DP ranks run in lockstep
    integ.check_config(_Cfg(sw("dp"), tp=2, dp=2))  # same shard, different DP replicas: right
    integ.check_config(_Cfg(sw(), dp=2))  # the external launcher


def test_mode_3_takes_both_layouts_and_sliced_paths_follow_graph_capture():
    from types import SimpleNamespace

    from ascend_compile.integrations import vllm as integ

    def sliced(paths=None):
        return {"ascend_compile": {"shared_weight": {"layers": ["o_proj"], "layout": "slices",
                                                    **({"paths": paths} if paths else {})}}}

    def mode_3(additional, cudagraph_mode, backend="inductor"):
        cfg = _Cfg(additional, mode=3, backend=backend, dp=2)
        cfg.compilation_config.cudagraph_mode = SimpleNamespace(name=cudagraph_mode) if cudagraph_mode else None
        return cfg

    integ.check_config(mode_3(sliced(), "NONE"))  # uncaptured pieces: the agreed path (the CPU engine test)
    for captured in ("FULL_AND_PIECEWISE", "PIECEWISE", "FULL_DECODE_ONLY", None):  # None: vLLM's default
        integ.check_config(mode_3(sliced("by_shape"), captured))
        with pytest.raises(ConfigError, match=r"captures graphs, and sliced layers with paths='agreed' agree on their "
                                              r"path with a host sync that capture refuses: set shared_weight "
                                              r"paths='by_shape'.*or cudagraph_mode='NONE'"):
            integ.check_config(mode_3(sliced(), captured))
    with pytest.raises(ConfigError, match=r"paths='by_shape' needs every rank to run the same token count.*"
                                          r"cudagraph_mode is NONE: drop paths"):
        integ.check_config(mode_3(sliced("by_shape"), "NONE"))
    with pytest.raises(ConfigError, match=r"mode 3 .* drop backend='ascend_compile' \(it is for modes 1 and 2\)"):
        integ.check_config(mode_3(sliced(), "NONE", backend="ascend_compile"))
    with pytest.raises(ConfigError, match=r"paths='by_shape' is for graphs captured at a fixed token count.*"
                                          r"drop paths \(the default, 'agreed'\)"):
        integ.check_config(_Cfg(sliced("by_shape"), dp=2))  # mode 2: never captured by vLLM

    # whole layers: scheduled inside each piece, captured or not; nothing may stay in flight between pieces
    def layers(**extra):
        return {"ascend_compile": {"shared_weight": {"layers": ["o_proj"], **extra}}}

    for captured in ("NONE", "FULL_AND_PIECEWISE", "PIECEWISE", None):
        config = mode_3(layers(), captured)
        integ.check_config(config)
        assert integ.shared_weight_config(config).wrap_around is False  # mode 3's default
    assert integ.shared_weight_config(_Cfg(layers(), dp=2)).wrap_around is True  # mode 2 keeps its own (off an NPU)
    with pytest.raises(ConfigError, match=r"wrap_around=True prefetches the first layers of each forward during the "
                                          r"one before, but compilation_config mode 3 .* drop wrap_around"):
        integ.check_config(mode_3(layers(wrap_around=True), "NONE"))
    lowered = layers()
    lowered["ascend_compile"]["compile"] = {"lowering": "aot_eager"}
    with pytest.raises(ConfigError, match=r"\['compile'\]\['lowering'\]='aot_eager' chooses our backend's lowering, "
                                          r"but under compilation_config mode 3 .* vLLM lowers each piece"):
        integ.check_config(mode_3(lowered, "NONE"))


def test_a_share_size_that_does_not_divide_the_group_is_refused_with_vllms_config(monkeypatch):
    from ascend_compile.integrations import vllm as integ

    def sized(size, group="dp"):
        return {"ascend_compile": {"shared_weight": {"layers": ["o_proj"], "share_size": size}, "group": group}}

    with pytest.raises(ConfigError, match=r"share_size=4 does not divide the 6 ranks of process group 'dp': "
                                          r"use one of \[2, 3, 6\]"):
        integ.check_config(_Cfg(sized(4), tp=2, dp=6))
    with pytest.raises(ConfigError, match=r"share_size=8 does not divide the 4 ranks of process group 'world'"):
        integ.check_config(_Cfg(sized(8, "world"), dp=4))
    integ.check_config(_Cfg(sized(2), tp=2, dp=4))
    integ.check_config(_Cfg(sized("machine"), tp=2, dp=4))  # known at shard time
    # "machine" without torchrun: vLLM's local DP ranks, each with its TP x PP ranks
    monkeypatch.delenv("GROUP_WORLD_SIZE", raising=False)
    cfg = _Cfg(sized("machine"), tp=2, dp=8)
    cfg.parallel_config.data_parallel_size_local = 4
    monkeypatch.setattr(integ.config, "_group", lambda name: None)
    assert integ.shared_weight_config(cfg).ranks_per_machine == 8


def test_config_errors_name_the_key_and_the_fix():
    from ascend_compile.integrations import vllm as integ

    with pytest.raises(ConfigError, match=r"unknown additional_config\['ascend_compile'\] key 'shared_weights'.*Did you mean 'shared_weight'"):
        integ.settings(_Cfg({"ascend_compile": {"shared_weights": {}}}))
    with pytest.raises(ConfigError, match=r"unknown shared_weight option 'layer'"):
        integ.shared_weight_config(_Cfg({"ascend_compile": {"shared_weight": {"layers": ["o_proj"], "layer": 1}}}))
    with pytest.raises(ConfigError, match=r"\['group'\] must be one of \['world', 'tp', 'dp'\]"):
        integ.settings(_Cfg({"ascend_compile": {"group": "pp"}}))
    sw = {"ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}
    integ.check_config(_Cfg(sw, mode=3, backend="inductor"))  # whole layers in vLLM's pieces (mode 3 test above)
    with pytest.raises(ConfigError, match=r"backend 'inductor' would run the shared weights without prefetching"):
        integ.check_config(_Cfg(sw, mode=2, backend="inductor"))
    integ.check_config(_Cfg(sw, mode=2))
    integ.check_config(_Cfg(sw, mode=1))
    sliced = {"ascend_compile": {"shared_weight": {"layers": ["o_proj"], "layout": "slices"}}}
    integ.check_config(_Cfg(sliced, mode=2))  # slices load through vLLM's loader (test_vllm_slices)
    integ.check_config(_Cfg({}, mode=3))  # nothing shared: nothing to refuse
    integ.check_config(_Cfg({}, mode=0, enforce_eager=True))


def test_eager_mode_with_shared_weights_is_refused(monkeypatch):
    """Mode 0 (NONE) never calls our backend or passes: one synchronous broadcast per layer, nothing
    prefetched. Refused, naming what made it eager (enforce_eager=True, which vLLM
    0.23 turns into mode 0 in VllmConfig.__post_init__, or an environment variable) and the fix."""
    from ascend_compile.integrations import vllm as integ

    sw = {"ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    monkeypatch.delenv("VLLM_USE_BREAKABLE_CUDAGRAPH", raising=False)
    with pytest.raises(ConfigError, match=re.escape(
            "need a compiled model (compilation_config mode 3, or mode 1 or 2 with backend='ascend_compile'): "
            "enforce_eager=True (vLLM then sets compilation mode 0, NONE), so vLLM runs the model eagerly and never "
            "calls our passes: every shared layer would be broadcast synchronously right before it is used, one broadcast per layer, nothing "
            "prefetched. Use compilation_config={'mode': 2, 'backend': 'ascend_compile'} and drop "
            "enforce_eager=True (--enforce-eager).")):
        integ.check_config(_Cfg(sw, mode=0, enforce_eager=True))
    with pytest.raises(ConfigError, match=r": compilation mode 0 \(NONE\), so vLLM runs the model eagerly.*"
                                          r"'backend': 'ascend_compile'}\.$"):
        integ.check_config(_Cfg(sw, mode=0))
    from types import SimpleNamespace

    uncaptured = _Cfg(sw, mode=0)
    uncaptured.compilation_config.cudagraph_mode = SimpleNamespace(name="NONE")
    with pytest.raises(ConfigError, match=r"vLLM-Ascend 0.23 sets it whenever cudagraph_mode is NONE\).*or keep "
                                          r"vLLM-Ascend's default, compilation mode 3 with graph capture"):
        integ.check_config(uncaptured)
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    with pytest.raises(ConfigError, match=r": TORCH_COMPILE_DISABLE=1 \(vLLM then sets compilation mode 0, NONE\).*"
                                          r"and unset TORCH_COMPILE_DISABLE\.$"):
        integ.check_config(_Cfg(sw, mode=0))


def test_enforce_eager_as_vllm_sets_it_is_refused(tmp_path):
    """Through vLLM's own configs: ``enforce_eager=True`` with mode 2 and our backend is mode 0 by
    the time the loader checks the config."""
    from transformers import LlamaConfig
    from vllm.config import CompilationConfig, DeviceConfig, ModelConfig, VllmConfig

    from ascend_compile.integrations import vllm as integ

    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(tmp_path)
    extra = {"ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}

    def config(enforce_eager):
        return VllmConfig(model_config=ModelConfig(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32",
                                                   max_model_len=64, enforce_eager=enforce_eager),
                          device_config=DeviceConfig(device="cpu"), additional_config=extra,
                          compilation_config=CompilationConfig(mode=2, backend="ascend_compile"))

    eager = config(True)
    assert int(eager.compilation_config.mode) == 0  # vLLM 0.23: enforce_eager means mode NONE
    with pytest.raises(ConfigError, match=r"enforce_eager=True \(vLLM then sets compilation mode 0.*drop "
                                          r"enforce_eager"):
        integ.check_config(eager)
    integ.check_config(config(False))


def test_vllm_ascend_layer_sharding_next_to_ours_is_refused():
    from ascend_compile.integrations import vllm as integ

    both = {"layer_sharding": ["o_proj", "q_b_proj"],
            "ascend_compile": {"shared_weight": {"layers": ["o_proj", "down_proj"]}}}
    with pytest.raises(ConfigError, match=re.escape(
            "additional_config['layer_sharding'] (vLLM-Ascend's layer sharding) and additional_config['ascend_compile']"
            "['shared_weight'] both shard ['o_proj']: those weights would be split twice. Use one: remove "
            "'layer_sharding' and list every layer in ours, additional_config={'ascend_compile': {'shared_weight': "
            "{'layers': ['down_proj', 'o_proj', 'q_b_proj']}}}.")):
        integ.check_config(_Cfg(both, mode=2))
    apart = {"layer_sharding": ["q_b_proj"], "ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}
    with pytest.raises(ConfigError, match=r"shard different layers \(\['q_b_proj'\] there, \['o_proj'\] here\)"):
        integ.check_config(_Cfg(apart, mode=2))
    integ.check_config(_Cfg({"layer_sharding": ["o_proj"]}, mode=2))  # theirs alone: not ours to judge


class _NPULikePlatform:
    """What vLLM-Ascend's NPUPlatform does with the compile mode (vllm_ascend/platform.py,
    ``_update_compilation_modes``): modes other than NONE and VLLM_COMPILE become NONE."""

    @classmethod
    def check_and_update_config(cls, vllm_config):
        from vllm.config import CompilationMode, CUDAGraphMode

        cc = vllm_config.compilation_config
        if cc.mode not in (CompilationMode.NONE, CompilationMode.VLLM_COMPILE):
            cc.mode = CompilationMode.NONE
        cc.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY


def test_whole_graph_mode_survives_a_platform_that_drops_it(monkeypatch):
    from vllm.config import CUDAGraphMode

    from ascend_compile.integrations import vllm as integ

    platform = type("NPULike", (_NPULikePlatform,), {})
    integ.keep_whole_graph_mode(platform)
    integ.keep_whole_graph_mode(platform)  # twice is harmless
    sw = {"ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}
    for mode in (1, 2):
        cfg = _Cfg(sw, mode=mode)
        platform.check_and_update_config(cfg)
        assert (cfg.compilation_config.mode, cfg.compilation_config.backend) == (mode, "ascend_compile")
        assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.NONE  # capture belongs to the lowering
    for cfg in (_Cfg({}, mode=2), _Cfg(sw, mode=2, backend="inductor")):  # not ours to keep
        platform.check_and_update_config(cfg)
        assert cfg.compilation_config.mode == 0
        assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    cfg = _Cfg(sw, mode=3)
    platform.check_and_update_config(cfg)
    assert cfg.compilation_config.mode == 3


def test_vllm_config_keeps_mode_2_through_the_platform_hook(monkeypatch):
    """Through vLLM's own VllmConfig.__post_init__, with a platform that drops mode 2."""
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig
    from vllm.platforms import current_platform

    from ascend_compile.integrations import vllm as integ

    monkeypatch.setattr(type(current_platform), "check_and_update_config",
                        classmethod(_NPULikePlatform.check_and_update_config.__func__))
    extra = {"ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}

    def config(additional):
        return VllmConfig(device_config=DeviceConfig(device="cpu"), additional_config=additional,
                          compilation_config=CompilationConfig(mode=2, backend="ascend_compile"))

    assert int(config(extra).compilation_config.mode) == 0  # what vLLM-Ascend does without us
    integ.register()
    cc = config(extra).compilation_config
    assert (int(cc.mode), cc.backend) == (2, "ascend_compile")
    assert int(config({}).compilation_config.mode) == 0  # nothing shared: the platform decides


def test_plugin_is_an_entry_point_and_wraps_the_loader(monkeypatch):
    from importlib.metadata import entry_points

    from ascend_compile.integrations import vllm as integ
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps["ascend_compile"] == "ascend_compile.integrations.vllm:register"
    monkeypatch.setattr(BaseModelLoader, "load_model", BaseModelLoader.load_model)
    integ.register()
    integ.register()  # twice is harmless
    assert getattr(BaseModelLoader.load_model, "_ascend_compile_wrapped", False)
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    integ.prepare(_Cfg({"ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}))
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    integ.prepare(_Cfg({"ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}))
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"  # the user's choice stands


def test_on_another_vllm_nothing_is_patched_and_shared_weights_are_refused_at_load(monkeypatch):
    import vllm
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ascend_compile.config import ConfigError
    from ascend_compile.integrations import vllm as integ

    platform = type(current_platform)
    for cls, name in ((BaseModelLoader, "load_model"), (GPUModelRunner, "reload_weights"),
                      (platform, "check_and_update_config")):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    loads = []
    monkeypatch.setattr(BaseModelLoader, "load_model", lambda self, *a: loads.append(a) or "model")
    before = (GPUModelRunner.reload_weights, platform.__dict__["check_and_update_config"])
    monkeypatch.setattr(vllm, "__version__", "0.24.0")
    integ.register()
    assert (GPUModelRunner.reload_weights, platform.__dict__["check_and_update_config"]) == before
    assert BaseModelLoader.load_model(None, _Cfg({}), "model_config") == "model"  # nothing shared: loads
    with pytest.raises(ConfigError, match=r"written against vLLM 0\.23\.x .* this is vLLM 0\.24\.0: .* Run vLLM 0\.23"):
        BaseModelLoader.load_model(None, _Cfg({"ascend_compile": {"shared_weight": {"layers": ["o_proj"]}}}), "m")
    assert len(loads) == 1


def test_weight_updates_a_sharded_model_cannot_take_are_refused(monkeypatch):
    """``reload_weights(is_checkpoint_format=False)`` and ``start_weight_update`` on a model we
    sharded raise before vLLM changes anything, naming the fix; an unsharded model goes straight
    through; the wrappers are installed once by ``register()``."""
    from types import SimpleNamespace

    from ascend_compile.integrations import vllm as integ
    from ascend_compile.runtime.errors import ShardingError
    from ascend_compile.runtime.sharding import PLAN_ATTR
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    for cls, name in ((BaseModelLoader, "load_model"), (GPUModelRunner, "reload_weights"),
                      (Worker, "start_weight_update")):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    integ.register()
    integ.register()  # twice is harmless: wrapped once
    assert GPUModelRunner.reload_weights.__wrapped__.__qualname__ == "GPUModelRunner.reload_weights"
    assert Worker.start_weight_update.__wrapped__.__qualname__ == "Worker.start_weight_update"

    calls = []
    def original(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):  # vLLM 0.23's
        calls.append(("reload", (weights_iterator, weights_path, is_checkpoint_format)))

    reload_weights = integ.reload_unshared(original)
    start = integ.refuse_weight_update(lambda self, *a, **k: calls.append(("start", a, k)))
    model = torch.nn.Linear(2, 2)
    runner = SimpleNamespace(get_model=lambda: model)
    worker = SimpleNamespace(model_runner=runner)
    reload_weights(runner, None, None, False)  # not sharded: vLLM's own behaviour
    start(worker, is_checkpoint_format=False)
    assert calls == [("reload", (None, None, False)), ("start", (), {"is_checkpoint_format": False})]

    setattr(model, PLAN_ATTR, SimpleNamespace(layer_series={"o_proj": ["0.o_proj", "1.o_proj"]}, layout="layers"))
    with pytest.raises(ShardingError, match=r"is_checkpoint_format=False\) on a model whose \['o_proj'\] weights "
                                            r"ascend_compile shares.*Reload with checkpoint-format weights"):
        reload_weights(runner, iter([]), None, False)
    with pytest.raises(ShardingError, match=r"is_checkpoint_format=False\)"):
        reload_weights(runner, weights_iterator=iter([]), is_checkpoint_format=False)
    for fmt in (True, False):
        with pytest.raises(ShardingError, match=r"start_weight_update on a model whose \['o_proj'\] weights.*"
                                                r"reload_weights with checkpoint-format weights"):
            start(worker, is_checkpoint_format=fmt)
    getattr(model, PLAN_ATTR).layout = "slices"  # no reload of slices yet, in either format
    for fmt in (True, False):
        with pytest.raises(ShardingError, match=r"reload_weights on a model whose \['o_proj'\] weights ascend_compile "
                                                r"keeps as slices \(layout='slices'\).*Use layout='layers'"):
            reload_weights(runner, iter([]), None, fmt)
    assert len(calls) == 2  # vLLM was never reached


def test_the_worker_that_runs_refuses_weight_updates_of_a_sharded_model(monkeypatch):
    """vLLM-Ascend's worker is ``NPUWorker(WorkerBase)``, not vLLM's GPU ``Worker``: the loader wraps
    ``start_weight_update`` of the class ``parallel_config.worker_cls`` names, whatever it is."""
    import sys
    import types
    from types import SimpleNamespace

    from ascend_compile.integrations.vllm.patches import refuse_weight_update_on
    from ascend_compile.runtime.errors import ShardingError
    from ascend_compile.runtime.sharding import PLAN_ATTR
    from vllm.v1.worker.worker_base import WorkerBase

    class NPUWorker(WorkerBase):  # what vllm_ascend/worker/worker.py v0.23.0 declares, as far as this goes
        def __init__(self, model):
            self.model_runner = SimpleNamespace(get_model=lambda: model)

        def start_weight_update(self, is_checkpoint_format=True):
            return "started"

    module = types.ModuleType("fake_vllm_ascend_worker")
    module.NPUWorker = NPUWorker
    monkeypatch.setitem(sys.modules, "fake_vllm_ascend_worker", module)
    assert refuse_weight_update_on("auto") is None and refuse_weight_update_on(None) is None
    assert refuse_weight_update_on("fake_vllm_ascend_worker.NPUWorker") is NPUWorker
    assert refuse_weight_update_on(NPUWorker) is NPUWorker  # wrapped once
    assert NPUWorker.start_weight_update.__wrapped__.__qualname__.endswith("NPUWorker.start_weight_update")
    assert not hasattr(NPUWorker.start_weight_update.__wrapped__, "__wrapped__")
    model = torch.nn.Linear(2, 2)
    assert NPUWorker(model).start_weight_update() == "started"  # not sharded: as before
    setattr(model, PLAN_ATTR, SimpleNamespace(layer_series={"o_proj": ["0.o_proj"]}, layout="layers"))
    with pytest.raises(ShardingError, match=r"start_weight_update on a model whose \['o_proj'\] weights"):
        NPUWorker(model).start_weight_update()


def _quant_case(rank, world):
    import vllm_model

    cfg, ctx = vllm_model.setup_vllm(rank, world)
    try:
        torch._dynamo.reset()
        _, x = vllm_model.inputs()
        ref = vllm_model.build_quant()(x)
        model = vllm_model.build_quant()
        plan = ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
        eager = model(x)
        out = torch.compile(model, backend="ascend_compile", fullgraph=True, options={"lowering": "aot_eager"})(x)
        return {"eager": torch.equal(eager, ref), "compiled": torch.equal(out, ref),
                "params": sorted({(p.param, p.dtype, p.shape) for p in plan.params})}
    finally:
        ctx.__exit__(None, None, None)


def test_quantized_layer_shares_every_parameter_as_processed():
    for r in run_ranks(_quant_case, 2):
        assert r["eager"] and r["compiled"]
        # the weight (int8, as process_weights_after_loading left it) and its scale are both shared
        assert r["params"] == [("weight", "int8", (64, 64)), ("weight_scale", "float32", (64,))]


def _packed_case(rank, world, meta_reads_weight):
    import vllm_model

    from ascend_compile.integrations import vllm as integ

    cfg, ctx = vllm_model.setup_vllm(rank, world)
    try:
        model, reference = (vllm_model.QuantStack(3, vllm_model.packing_config(meta_reads_weight)) for _ in range(2))
        with torch.no_grad():  # the loaded values (create_weights leaves them uninitialised)
            for i, (a, b) in enumerate(zip(model.layers, reference.layers)):
                w = torch.randn(a["o_proj"].weight.shape, generator=torch.Generator().manual_seed(i)) / 8
                a["o_proj"].weight.copy_(w)
                b["o_proj"].weight.copy_(w)
        _, x = vllm_model.inputs()
        vllm_model.process(reference)
        shared = ac.SharedWeightConfig(layers=["o_proj"])
        skipped = integ.skip_non_owned(model, shared)
        vllm_model.process(model)  # what vLLM's loader does after reading the checkpoint
        try:
            integ.finish_non_owned(model, shared, skipped)
        except ac.ShardingError as e:
            return {"error": str(e)}
        ac.shard_model(model, shared)
        owned = [m["o_proj"] for i, m in enumerate(model.layers) if i % world == rank]
        return {"error": None, "equal": torch.equal(model(x), reference(x)),
                "owned_numel": [m.parametrizations.weight.original.numel() for m in owned],
                "reads_weight": all(m.cpu_linear is torch.nn.functional.linear for m in model.layers.modules()
                                    if hasattr(m, "cpu_linear"))}
    finally:
        ctx.__exit__(None, None, None)


def _default_device_case(rank, world, quantized):
    """vLLM's load-time path (``skip_non_owned``, processing, ``finish_non_owned``, ``shard_model``)
    and the forward with the default device elsewhere (meta) than the model (CPU): every stand-in
    must be on the device of the parameter it stands for."""
    import vllm_model

    from ascend_compile.integrations import vllm as integ

    cfg, ctx = vllm_model.setup_vllm(rank, world)
    try:
        torch._dynamo.reset()
        positions, x = vllm_model.inputs()
        if quantized:  # processing changes the weight's layout: the stand-ins take the owners' processed shapes
            series, args = ["o_proj"], (x,)
            reference = vllm_model.build_quant()
            torch.manual_seed(0)  # the same values as build_quant's, not yet processed
            model = vllm_model.QuantStack(3)
        else:
            series, args = SERIES, (positions, x)
            reference, model = vllm_model.build(), vllm_model.build(processed=False)
        ref = reference(*args)
        devices = {name: p.device for name, p in model.named_parameters()}
        shared = ac.SharedWeightConfig(layers=series, prefetch_step=1)
        with torch.device("meta"):  # what torch.set_default_device("meta") sets
            skipped = integ.skip_non_owned(model, shared)
            vllm_model.process(model, onednn=False)  # what vLLM's loader does after reading the checkpoint
            integ.finish_non_owned(model, shared, skipped)
            plan = ac.shard_model(model, shared)
            try:
                out = model(*args)
                error = None
            except Exception as e:  # reported with the devices, which say why
                out, error = None, f"{type(e).__name__}: {str(e)[:300]}"
        modules = dict(model.named_modules())
        standins = {}
        for sp in plan.params:
            if sp.owner != rank:
                p = getattr(modules[sp.module].parametrizations, sp.param).original
                standins[f"{sp.module}.{sp.param}"] = (str(p.device), str(devices[f"{sp.module}.{sp.param}"]))
        return {"standins": standins, "error": error, "equal": out is not None and torch.equal(out, ref)}
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("quantized", [False, True])
def test_load_time_standins_take_the_models_device_not_the_default_one(quantized):
    for rank, r in enumerate(run_ranks(_default_device_case, 2, quantized)):
        assert r["standins"], "no layer is a stand-in on this rank"
        wrong = {name: d for name, d in r["standins"].items() if d[0] != d[1]}
        assert not wrong, f"rank {rank}: stand-ins not on their parameter's device (stand-in, parameter): {wrong}"
        assert r["error"] is None and r["equal"], r["error"]


def test_a_weight_packed_into_a_kernel_handle_stays_a_shared_parameter():
    """vLLM CPU's oneDNN dispatch: processing without values reads the weight, so owners keep it."""
    for rank, r in enumerate(run_ranks(_packed_case, 2, True)):
        assert r["error"] is None
        assert r["equal"], "sharded output differs from the packed, unsharded model"
        assert r["owned_numel"] == [64 * 64] * (2 if rank == 0 else 1)
        assert r["reads_weight"]


def test_a_weight_only_a_kernel_handle_can_read_is_refused_on_every_rank():
    for r in run_ranks(_packed_case, 2, False):
        msg = r["error"]
        assert msg.startswith("layers.0.o_proj: process_weights_after_loading left ['weight'] with no elements")
        assert "cannot be shared. Leave this series out" in msg


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def _load_case(rank, world, quantized, share):
    """Load through vLLM's own BaseModelLoader.load_model (wrapped by our plugin)."""
    import gc
    from types import SimpleNamespace
    from unittest import mock

    import vllm_model
    from vllm.config import CompilationConfig, DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    from ascend_compile.integrations import vllm as integ

    extra = {"ascend_compile": {"shared_weight": {"layers": ["o_proj"], "prefetch_step": 1}}} if share else {}
    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"), additional_config=extra,
                     compilation_config=CompilationConfig(mode=2, backend="ascend_compile"))
    with set_current_vllm_config(cfg):
        vllm_model.init_model_parallel(rank, world)
        integ.register()
        layers, dim = 8, 2048
        reference = vllm_model.build_quant(3) if quantized else None

        def create_model(vllm_config, model_config, prefix=""):
            if quantized:
                return vllm_model.QuantStack(3)
            from vllm.model_executor.layers.linear import RowParallelLinear

            return torch.nn.Sequential(*[torch.nn.ModuleDict({"o_proj": RowParallelLinear(
                dim, dim, bias=False, prefix=f"{i}.o_proj")}) for i in range(layers)])

        class DictLoader(BaseModelLoader):
            read = []
            dropped = set()

            def download_model(self, model_config):
                pass

            def load_weights(self, model, model_config):
                source = reference.state_dict() if quantized else None
                for name, p in model.named_parameters():
                    if quantized:  # the checkpoint holds the unprocessed layout: [out, in]
                        t = source[name].t().contiguous() if name.endswith("weight") else source[name]
                    else:
                        t = torch.full(tuple(p.shape), float(len(self.read) + 1))
                    self.read.append(name)
                    loader = getattr(p, "weight_loader", default_weight_loader)
                    if loader is integ._drop_weight:
                        self.dropped.add(name)
                    loader(p, t)
                    del t

        model_config = SimpleNamespace(dtype=torch.float32, hf_config=None, word_embeddings_untied_by_checkpoint=False,
                                       quantization=None)
        # vLLM 0.23's load_model builds the model with base_loader.initialize_model
        with mock.patch("vllm.model_executor.model_loader.base_loader.initialize_model", create_model):
            if not quantized:  # warm up: the first load imports and builds a lot that is not weights
                warm = VllmConfig(device_config=DeviceConfig(device="cpu"))
                DictLoader(LoadConfig()).load_model(warm, model_config)
                DictLoader.read = []
            gc.collect()
            base = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            model = DictLoader(LoadConfig()).load_model(cfg, model_config)
            peak = _status("VmHWM") - base
        result = {"peak": peak, "layer": dim * dim * 4, "plan": ac.get_plan(model) is not None,
                  "dropped": sorted(DictLoader.dropped)}
        if quantized:
            _, x = vllm_model.inputs()
            result["equal"] = torch.equal(model(x), vllm_model.build_quant(3)(x))
        else:
            # each layer's output on ones: exact in any summation order, whatever GEMM the
            # platform picked (vLLM CPU: oneDNN when replicated, F.linear for shared layers)
            ones = torch.ones(1, dim)
            result["values"] = [float(m["o_proj"](ones)[0].sum()) for m in model]
        return result


def test_load_time_sharding_never_materialises_non_owned_layers(monkeypatch):
    from ranks import run_fresh

    # fresh ranks with a fixed mmap threshold: every layer-sized tensor is its own mapping,
    # so RSS follows the live tensors instead of glibc's heap reuse
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    shared = run_fresh(_load_case, 2, False, True)
    replicated = run_fresh(_load_case, 2, False, False)
    for s, r in zip(shared, replicated):
        assert s["plan"] and not r["plan"]
        layer = s["layer"]
        # each rank owns 4 of 8 layers and never writes the other 4: its loading peak is the
        # sharded steady state (4 layers) plus one checkpoint tensor in flight (measured 5.0;
        # replicated 9.0)
        assert s["peak"] <= 5 * layer + 4 * 2**20, (s["peak"] / layer, r["peak"] / layer)
        assert r["peak"] >= 8 * layer
        assert s["values"] == r["values"]  # every rank reads every layer's loaded value
    # the checkpoint tensors of the layers a rank does not own were dropped, not copied
    assert shared[0]["dropped"] == [f"{i}.o_proj.weight" for i in (1, 3, 5, 7)]
    assert shared[1]["dropped"] == [f"{i}.o_proj.weight" for i in (0, 2, 4, 6)]
    assert replicated[0]["dropped"] == []


def test_load_time_sharding_of_a_quantized_layer():
    for r in run_ranks(_load_case, 2, True, True):
        assert r["plan"] and r["equal"]


def _vllm_ready_case(rank, world):
    import vllm_model

    cfg, ctx = vllm_model.setup_vllm(rank, world)
    ctx.__exit__(None, None, None)


def _fails_alone_case(rank, world, where):
    """Load through vLLM's ``BaseModelLoader.load_model`` (wrapped by our plugin) where rank 1 alone
    fails: in the owner-only ``process_weights_after_loading`` of the layer it owns (``"process"``),
    or while reading the checkpoint (``"load"``). Returns what each rank raised, and when."""
    import time
    from types import SimpleNamespace
    from unittest import mock

    import vllm_model
    from vllm.config import CompilationConfig, DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from ascend_compile.integrations import vllm as integ

    extra = {"ascend_compile": {"shared_weight": {"layers": ["o_proj"], "prefetch_step": 1}}}
    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"), additional_config=extra,
                     compilation_config=CompilationConfig(mode=2, backend="ascend_compile"))
    with set_current_vllm_config(cfg):
        vllm_model.init_model_parallel(rank, world)
        integ.register()
        failing = where == "process"
        quant = vllm_model.raising_config(1, "cannot repack this weight for the device") if failing else None

        def create_model(vllm_config, model_config, prefix=""):
            return vllm_model.QuantStack(3, quant or vllm_model.int8_config())

        class Loader(BaseModelLoader):
            def download_model(self, model_config):
                pass

            def load_weights(self, model, model_config):
                if where == "load" and rank == 1:
                    raise FileNotFoundError("model-00002-of-00002.safetensors: no such file")
                for _, p in model.named_parameters():
                    getattr(p, "weight_loader", lambda p, t: None)(p, torch.zeros(p.shape, dtype=p.dtype))

        model_config = SimpleNamespace(dtype=torch.float32, hf_config=None, word_embeddings_untied_by_checkpoint=False,
                                       quantization=None)
        start = time.monotonic()
        with mock.patch("vllm.model_executor.model_loader.base_loader.initialize_model", create_model):
            try:
                Loader(LoadConfig()).load_model(cfg, model_config)
            except Exception as e:
                cause = e.__cause__
                return {"error": f"{type(e).__name__}: {e}", "ours": isinstance(e, (ac.ShardingError, ConfigError)),
                        "cause": f"{type(cause).__name__}" if cause else None,
                        "seconds": time.monotonic() - start}
        return {"error": None, "seconds": time.monotonic() - start}


@pytest.mark.parametrize("where", ["process", "load"])
def test_a_rank_that_fails_alone_while_loading_stops_every_rank_at_once(where):
    """Rank 1 alone raises between building the model and the ranks' exchange (its owner-only
    processing, or reading the checkpoint) while rank 0 goes on to the exchange: both raise an
    ascend_compile error within seconds naming rank 1 and what it raised, instead of rank 0
    waiting in the exchange for the group's timeout (30 minutes; the deadline here is 120 s)."""
    problem = ("ValueError: cannot repack this weight for the device" if where == "process" else
               "FileNotFoundError: model-00002-of-00002.safetensors: no such file")
    run_ranks(_vllm_ready_case, 2)  # vLLM imported and its groups made before the deadline starts
    results = run_ranks(_fails_alone_case, 2, where, timeout=120)  # the exchange completes: the pool stays usable
    print({rank: round(r["seconds"], 2) for rank, r in enumerate(results)})
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank} did not raise"
        assert r["ours"], r["error"]
        assert r["seconds"] < 30, r
        assert problem in r["error"], r["error"]
        if where == "process":  # the layer rank 1 owns and failed to process
            assert "layers.1.o_proj: process_weights_after_loading raised " + problem in r["error"], r["error"]
    assert results[1]["error"].startswith("ShardingError: rank 1: "), results[1]["error"]
    assert results[1]["cause"] == ("ShardingError" if where == "process" else "FileNotFoundError")
    assert re.match(r"ShardingError: rank 1 of process group '\w+' failed loading the model with shared weights, so "
                    r"every rank stops here: ShardingError: rank 1: ", results[0]["error"]), results[0]["error"]


def test_vllm_plugins_selects_us_by_name(monkeypatch):
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    from ascend_compile.integrations.vllm import register

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["ascend_compile"] is register
    monkeypatch.setenv("VLLM_PLUGINS", "ascend_compile")
    assert list(load_plugins_by_group(DEFAULT_PLUGINS_GROUP)) == ["ascend_compile"]
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    assert "ascend_compile" not in load_plugins_by_group(DEFAULT_PLUGINS_GROUP)


@pytest.mark.parametrize("mode", [1, 2])
def test_vllm_resolves_our_backend_name_in_modes_1_and_2(mode):
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig

    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"),
                     compilation_config=CompilationConfig(mode=mode, backend="ascend_compile"))
    # vLLM hands this name to torch.compile, which finds it through our entry point
    assert cfg.compilation_config.init_backend(cfg) == "ascend_compile"


def _run_example(tmp_path, *args) -> tuple:
    """Run examples/vllm_generate.py (two torchrun jobs, unshared then shared) into ``tmp_path``:
    ``(its stdout, summary.json)``; fails the test with the output's tail if it fails."""
    import json
    import sys

    from ranks import run_command

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "vllm_generate.py")
    code, out, err = run_command([sys.executable, example, *args, "--dir", str(tmp_path), "--timeout", "500"],
                                 timeout=1060)
    assert code == 0, out[-3000:] + err[-3000:]
    with open(tmp_path / "summary.json") as f:
        return out, json.load(f)


def _assert_ranks_ran_in_lockstep(results: dict, ranks: int, idle: list) -> None:
    """What each rank's engine ran during the generate (counted by the example, ``count_forwards``):
    every rank ran the same number of model forwards, with and without sharing (each forward's
    broadcasts pair with a peer's); the ranks in ``idle`` (those whose requests finished first)
    made up the difference with vLLM's dummy forwards, the others ran none; and the tokens each
    rank generated are the tokens it returned, the same without sharing."""
    for run in ("unshared", "shared"):
        r = [results[f"{run}_rank{rank}"] for rank in range(ranks)]
        forwards = [x["forwards"] for x in r]
        dummy = [x["dummy_forwards"] for x in r]
        real = [f - d for f, d in zip(forwards, dummy)]
        assert len(set(forwards)) == 1, f"{run}: forwards per rank {forwards} (dummy {dummy})"
        assert [d > 0 for d in dummy] == [rank in idle for rank in range(ranks)], f"{run}: dummy forwards {dummy}"
        for rank, x in enumerate(r):
            # a request's tokens take one forward each (the first comes from its prefill)
            assert real[rank] >= max(len(t) for t in x["tokens"]), (run, rank, real[rank], x["tokens"])
            assert x["generated"] == sum(len(t) for t in x["tokens"]) > 0
    for rank in range(ranks):
        unshared, shared = results[f"unshared_rank{rank}"], results[f"shared_rank{rank}"]
        assert (shared["forwards"], shared["dummy_forwards"], shared["generated"]) == (
            unshared["forwards"], unshared["dummy_forwards"], unshared["generated"])


@pytest.mark.timeout(1100)  # two torchrun jobs of up to 500 s each; the example kills them
# DeepSeek-V2 through the engine: tests/test_vllm_ascend_mla.py (q_b_proj and o_proj inside the attention op)
@pytest.mark.parametrize("model, step", [("llama", "auto")])
def test_generate_through_vllms_engine_equals_the_unshared_run(model, step, tmp_path):
    """``LLM(...).generate`` on 4 data-parallel ranks under torchrun (external launcher), each
    rank with different requests, compiled by vLLM (mode 2) with our backend, sharing in blocks of
    2 (``share_size=2``): greedy tokens with shared weights equal those without, on every rank
    (prefill and decode), and each rank holds what its block saves. Then vLLM's own reload path,
    ``llm.collective_rpc("reload_weights")`` (which the CPU runner inherits from the GPU runner),
    between generates on every rank, unshared and shared (``_assert_reloads``; mode 1:
    ``test_mode_1_dp_ranks_that_recompile_at_different_calls_equal_the_unshared_run``)."""
    out, results = _run_example(tmp_path, "--model", model, "--prefetch-step", step, "--dp", "4", "--share-size", "2",
                                "--reload")
    series = ["down_proj", "o_proj"] + (["q_b_proj"] if model == "deepseek_v2" else [])
    for rank in range(4):
        unshared, shared = results[f"unshared_rank{rank}"], results[f"shared_rank{rank}"]
        assert unshared["plan"] is None
        plan = shared["plan"]
        assert plan["series"] == series and plan["world_size"] == 2 and plan["blocks"] == 2
        assert plan["block"] == rank // 2 and plan["ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert shared["tokens"] == unshared["tokens"]
        # what this rank holds: less by what the plan says it no longer stores (stand-ins keep 1 element each);
        # a block of 2 saves half of every series
        saved = unshared["weight_bytes"] - shared["weight_bytes"]
        assert plan["saved_bytes"] == plan["series_bytes"] // 2
        assert abs(saved - plan["saved_bytes"]) < 0.02 * plan["saved_bytes"]
        assert f"rank {rank}: equal=True" in out
    # the ranks served different requests (rank 0 fewest and shortest): ranks 0-2 finished first and
    # ran vLLM's dummy forwards until rank 3 was done, the same number of forwards on every rank
    _assert_ranks_ran_in_lockstep(results, 4, idle=[0, 1, 2])
    assert len({str(results[f"shared_rank{r}"]["tokens"]) for r in range(4)}) == 4
    _assert_reloads(out, results, 4)


@pytest.mark.timeout(1100)  # two torchrun jobs of up to 500 s each; the example kills them
@pytest.mark.parametrize("model, decode_tokens", [("llama", "8")])
def test_generate_with_slices_through_vllms_engine_equals_the_unshared_run(model, decode_tokens, tmp_path):
    """``layout="slices"`` through ``LLM(...).generate`` on 2 DP ranks under torchrun, compiled by
    vLLM (mode 2) with our backend, the ranks with different requests (so different token counts
    in one forward, and rank 0 idle in vLLM's dummy forwards while rank 1 decodes): greedy tokens
    equal the unshared run's on every rank, each rank holds half of every shared layer, and the
    ranks took the same path in every forward (with ``decode_tokens=8``: the prefill forward on
    the gather path, every decode step on the slices path)."""
    out, results = _run_example(tmp_path, "--model", model, "--layout", "slices", "--decode-tokens", decode_tokens)
    series = ["down_proj", "o_proj"] + (["q_b_proj"] if model == "deepseek_v2" else [])
    for rank in range(2):
        unshared, shared = results[f"unshared_rank{rank}"], results[f"shared_rank{rank}"]
        plan = shared["plan"]
        assert plan["series"] == series and plan["layout"] == "slices" and plan["world_size"] == 2
        assert shared["tokens"] == unshared["tokens"]
        assert plan["saved_bytes"] == plan["series_bytes"] // 2
        saved = unshared["weight_bytes"] - shared["weight_bytes"]
        assert abs(saved - plan["saved_bytes"]) < 0.02 * plan["saved_bytes"]
        paths = shared["paths"]
        assert paths["slices"] + paths["gather"] == shared["forwards"], (paths, shared["forwards"])
        if decode_tokens == "8":
            assert plan["decode_tokens"] == 8
            assert paths["gather"] >= 1 and paths["slices"] >= max(len(t) for t in shared["tokens"]) - 1, paths
        else:
            assert isinstance(plan["decode_tokens"], int)
        assert f"rank {rank}: equal=True" in out
    assert results["shared_rank0"]["paths"] == results["shared_rank1"]["paths"]  # agreed, forward by forward
    _assert_ranks_ran_in_lockstep(results, 2, idle=[0])


@pytest.mark.timeout(1100)  # two torchrun jobs of up to 500 s each; the example kills them
def test_generate_with_tp2_x_dp2_equals_the_unshared_run(tmp_path):
    """``LLM(...).generate`` on 4 ranks under torchrun (external launcher): 2 data-parallel
    replicas of 2 tensor-parallel ranks each (``--tp 2``), the replicas with different requests,
    compiled by vLLM (mode 2) with our backend. Each TP shard is shared between the 2 ranks that
    hold it (``"group": "dp"``): greedy tokens equal those without sharing, on every rank."""
    # the subject is the groups, not the lowering (Inductor: the DP=4 and slices engine tests): aot_eager compiles faster
    out, results = _run_example(tmp_path, "--model", "llama", "--prefetch-step", "1", "--tp", "2", "--share-size", "machine",
                                "--lowering", "aot_eager")
    for rank in range(4):
        unshared, shared = results[f"unshared_rank{rank}"], results[f"shared_rank{rank}"]
        assert unshared["plan"] is None
        assert shared["dp_rank"] == unshared["dp_rank"] == rank // 2  # ranks 0, 1: replica 0; 2, 3: replica 1
        # shared over the DP group (2 ranks), not the world of 4: each rank's TP shard of every layer
        assert shared["plan"]["series"] == ["down_proj", "o_proj"] and shared["plan"]["world_size"] == 2
        # share_size="machine": torchrun's 4 ranks on this machine; TP rank t's DP group is global ranks t, t + 2
        assert shared["plan"]["ranks"] == [rank % 2, rank % 2 + 2] and shared["plan"]["blocks"] == 1
        assert shared["tokens"] == unshared["tokens"]
        saved = unshared["weight_bytes"] - shared["weight_bytes"]
        assert abs(saved - shared["plan"]["saved_bytes"]) < 0.02 * shared["plan"]["saved_bytes"]
        assert f"rank {rank}: equal=True" in out
    # the TP ranks of a replica served its requests together; the replicas served different ones, and
    # replica 0 (ranks 0, 1), done first, ran dummy forwards until replica 1 was done
    assert results["shared_rank0"]["tokens"] == results["shared_rank1"]["tokens"]
    assert results["shared_rank0"]["tokens"] != results["shared_rank2"]["tokens"]
    _assert_ranks_ran_in_lockstep(results, 4, idle=[0, 1])


@pytest.mark.timeout(1100)  # two torchrun jobs of up to 500 s each; the example kills them
def test_mode_1_dp_ranks_that_recompile_at_different_calls_equal_the_unshared_run(tmp_path):
    """vLLM mode 1 (plain torch.compile of the whole model, dynamic shapes) with 2 DP ranks given
    different batches: Dynamo recompiles when a rank first meets a batch shape, at different calls
    on the two ranks (a rank with one request left specialises on 1 token). Nothing but the
    graphs' broadcasts talks between the ranks after loading, so no rank waits for another's
    compile: the shared run finishes and its tokens equal the unshared run's on both ranks."""
    import glob
    import json

    out, results = _run_example(tmp_path, "--model", "llama", "--prefetch-step", "1", "--mode", "1", "--reload",
                                "--lowering", "aot_eager")  # recompiles and reloads, whatever lowers the graphs
    for rank in range(2):
        assert results[f"shared_rank{rank}"]["tokens"] == results[f"unshared_rank{rank}"]["tokens"]
    _assert_reloads(out, results, 2)  # and vLLM's reload_weights in mode 1 (one job for both)
    _assert_ranks_ran_in_lockstep(results, 2, idle=[0])  # counted around the model's compiled call
    graphs = {}
    for path in glob.glob(str(tmp_path / "dumps" / "**" / "rank_*" / "graph_*" / "schedule.json"), recursive=True):
        rank = int(path.split("rank_")[-1].split(os.sep)[0])
        with open(path) as f:
            graphs.setdefault(rank, []).append(json.load(f)["order"])
    assert sorted(graphs) == [0, 1], sorted(graphs)
    # more than one graph per rank (recompiles), all issuing the same broadcasts in the same order
    assert all(len(g) >= 2 for g in graphs.values()), {r: len(g) for r, g in graphs.items()}
    orders = [o for g in graphs.values() for o in g]
    # o_proj + down_proj, 4 layers, and layer 0 of each again: sent for the next forward (wrap-around)
    assert all(o == orders[0] for o in orders) and len(orders[0]) == 10
    assert [o for o in orders[0] if o.endswith("(next step)")] == [
        o.replace("(window)", "(next step)") for o in orders[0] if o.endswith("(window)")]


def _assert_reloads(out: str, results: dict, ranks: int) -> None:
    """The checkpoint reloaded gives the same tokens as before, changed weights (``perturbed_weights``,
    a ``weights_iterator`` through the same path) give the unshared run's new tokens, and the
    checkpoint again gives the first tokens back. With shared weights our plugin's wrapper of
    ``model.load_weights`` drops the prefetched windows at each of the 3 reloads on every rank,
    and each rank still holds only what it owns. In mode 1, Dynamo's guards stay: a reload that
    gave the shared layers new classes or modules would recompile every shape again and hit
    the recompile limit (fullgraph=True fails) by the third generate."""
    lines = []
    for rank in range(ranks):
        unshared, shared = results[f"unshared_rank{rank}"], results[f"shared_rank{rank}"]
        assert shared["tokens"] == unshared["tokens"]
        for r in (unshared, shared):
            assert r["tokens_reloaded"] == r["tokens"] and r["tokens_restored"] == r["tokens"]
        assert shared["tokens_changed"] == unshared["tokens_changed"] != shared["tokens"]
        assert unshared["invalidations"] == []  # nothing shared: nothing wrapped
        assert len(shared["invalidations"]) == 3, shared["invalidations"]
        assert all(line.startswith("ascend_compile: weights loaded again; dropped the prefetched windows")
                   for line in shared["invalidations"])
        lines.append(shared["invalidations"])
        assert shared["weight_bytes_reloaded"] == shared["weight_bytes"] < unshared["weight_bytes"]
        assert re.search(rf"rank {rank}: reload: same=True \(.*\), follows=True \(.*\), invalidated=3 of 3 reloads, "
                         r"kept=True", out)
    assert lines[0] == lines[1]  # the same windows dropped on both ranks (of one block with --share-size 2)
