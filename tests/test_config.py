"""Configuration errors name the problem and the fix; no process group needed."""

import pytest
import torch

import ascend_compile as ac
from ascend_compile.config import CompileOptions, ConfigError, SharedWeightConfig


@pytest.mark.parametrize("layers, match", [
    ([], "layers must be a non-empty list"),
    ([3], "layers must be a non-empty list"),
    (["o_proj", "o_proj"], r"lists \['o_proj'\] more than once"),
])
def test_bad_layers(layers, match):
    with pytest.raises(ConfigError, match=match):
        SharedWeightConfig(layers=layers)


@pytest.mark.parametrize("step, match", [
    (-1, "prefetch_step must be >= 0, got -1"),
    (True, "must be a non-negative int"),
    (1.5, "must be a non-negative int"),
    ("automatic", "must be a non-negative int or 'auto'"),
])
def test_bad_prefetch_step(step, match):
    with pytest.raises(ConfigError, match=match):
        SharedWeightConfig(layers=["o_proj"], prefetch_step=step)


def test_auto_step_is_accepted():
    assert SharedWeightConfig(layers=["o_proj"], prefetch_step="auto").prefetch_step == "auto"
    assert CompileOptions(prefetch_step="auto", cost_model={"bandwidth": 1e9}).prefetch_step == "auto"


def test_single_layer_name_string_is_accepted():
    assert SharedWeightConfig(layers="o_proj").layers == ["o_proj"]


def test_from_dict_names_unknown_keys_and_missing_layers():
    with pytest.raises(ConfigError, match=r"unknown shared_weight option 'prefetch'.*Did you mean 'prefetch_step'"):
        SharedWeightConfig.from_dict({"layers": ["o_proj"], "prefetch": 1})
    with pytest.raises(ConfigError, match="needs 'layers'"):
        SharedWeightConfig.from_dict({"prefetch_step": 1})
    assert SharedWeightConfig.from_dict({"layers": ["o_proj"], "prefetch_step": 0}).prefetch_step == 0


def test_compile_options():
    with pytest.raises(ConfigError, match=r"unknown lowering 'inductr'.*Did you mean 'inductor'"):
        CompileOptions(lowering="inductr")
    with pytest.raises(ConfigError, match=r"unknown ascend_compile option 'dumpdir'.*Did you mean 'dump_dir'"):
        CompileOptions.from_dict({"dumpdir": "x"})
    with pytest.raises(ConfigError, match=r"options\['prefetch_step'\] must be >= 0"):
        CompileOptions.from_dict({"prefetch_step": -2})
    assert CompileOptions().lowering == "inductor"  # no torch_npu here


def test_dump_dir_from_environment(monkeypatch):
    monkeypatch.setenv("ASCEND_COMPILE_DUMP", "/tmp/somewhere")
    assert CompileOptions().dump_dir == "/tmp/somewhere"
    assert CompileOptions(dump_dir="/tmp/mine").dump_dir == "/tmp/mine"


def test_shard_model_without_process_group_says_what_to_do():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ac.ShardingError, match=r"not initialised.*init_process_group"):
        ac.shard_model(torch.nn.Linear(2, 2), SharedWeightConfig(layers=["x"]))


def test_shard_model_wants_a_config_object():
    with pytest.raises(TypeError, match="SharedWeightConfig"):
        ac.shard_model(torch.nn.Linear(2, 2), {"layers": ["x"]})


def test_backend_is_registered_by_entry_point():
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import lookup_backend

    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names["ascend_compile"] == "ascend_compile.backend:ascend_compile_backend"
    from ascend_compile.backend import ascend_compile_backend

    assert lookup_backend("ascend_compile") is ascend_compile_backend


def test_unsharded_model_passes_through_like_inductor():
    from ascend_compile.models import StackShape, build_stack, make_input

    torch._dynamo.reset()
    shape = StackShape(layers=2)
    model, x = build_stack(shape), make_input(shape)
    ref = torch.compile(model, backend="inductor")(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend="ascend_compile", fullgraph=True)(x)
    assert torch.equal(out, ref)
