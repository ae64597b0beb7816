"""shard_model on gloo ranks: bitwise eager equality, storage freed, and its errors."""

import pytest
import torch
from torch import nn

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ascend_compile.runtime.series import is_standin
from ranks import run_fresh, run_ranks

SERIES = ["o_proj", "q_b_proj"]


def _eager_case(rank, world, layers, dtype_name, bias):
    dtype = getattr(torch, dtype_name)
    shape = StackShape(layers=layers, bias=bias)
    x = make_input(shape, dtype=dtype)
    ref = build_stack(shape, dtype=dtype)(x)
    model = build_stack(shape, dtype=dtype)
    before = ac.parameter_storage_bytes(model)
    plan = ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1))
    after = ac.parameter_storage_bytes(model)
    out = model(x)
    standins = {name for name, p in model.named_parameters() if is_standin(p)}
    return {
        "equal": torch.equal(out, ref), "saved": before - after, "planned": plan.saved_bytes(),
        "series_bytes": plan.series_bytes(), "standins": sorted(standins),
        "owners": sorted({(p.module, p.owner) for p in plan.params}),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_eager_is_bitwise_and_frees_k_minus_1_over_k(world):
    results = run_ranks(_eager_case, world, 6, "float32", True)
    for rank, r in enumerate(results):
        assert r["equal"], f"rank {rank}: sharded eager output differs from the unsharded model"
        assert r["saved"] == pytest.approx(r["series_bytes"] * (world - 1) / world, rel=0.01)
        assert abs(r["saved"] - r["planned"]) <= 64 * len(r["standins"])  # stand-ins keep one element
        # non-owned layers are stand-ins, owned ones are not: layer i lives on rank i % world
        for module, owner in r["owners"]:
            for p in ("weight", "bias"):
                name = f"{module}.parametrizations.{p}.original"
                assert (name in r["standins"]) == (owner != rank), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_eager_low_precision_and_uneven_layers(dtype):
    results = run_ranks(_eager_case, 2, 5, dtype, False)  # 5 % 2 != 0
    assert all(r["equal"] for r in results)
    # rank 0 owns layers 0, 2, 4; rank 1 owns 1, 3
    assert results[0]["saved"] < results[1]["saved"]
    for r in results:
        assert abs(r["saved"] - r["planned"]) <= 8 * len(r["standins"])


class Odd(nn.Module):
    def __init__(self, wide_last: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"o_proj": nn.Linear(8, 8)}) for _ in range(3))
        if wide_last:
            self.layers[2]["o_proj"] = nn.Linear(16, 8)


def _errors_case(rank, world):
    msgs = {}

    def catch(key, fn):
        try:
            fn()
        except Exception as e:
            msgs[key] = f"{type(e).__name__}: {e}"

    stack = lambda: build_stack(StackShape(layers=2))  # noqa: E731
    catch("unknown", lambda: ac.shard_model(stack(), ac.SharedWeightConfig(layers=["o_prj"])))
    catch("shapes", lambda: ac.shard_model(Odd(True), ac.SharedWeightConfig(layers=["o_proj"])))
    catch("step", lambda: ac.shard_model(stack(), ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=2)))
    catch("parent", lambda: ac.shard_model(stack(), ac.SharedWeightConfig(layers=["self_attn"])))
    catch("overlap", lambda: ac.shard_model(stack(), ac.SharedWeightConfig(layers=["o_proj", "self_attn.o_proj"])))
    model = stack()
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"]))
    catch("twice", lambda: ac.shard_model(model, ac.SharedWeightConfig(layers=["q_b_proj"])))
    catch("mismatch", lambda: ac.shard_model(stack(), ac.SharedWeightConfig(layers=["o_proj" if rank == 0 else "q_b_proj"])))
    return msgs


def test_errors_name_the_problem_and_the_fix():
    for rank, m in enumerate(run_ranks(_errors_case, 2)):
        assert "ConfigError: no module of DeepSeekShapedStack is named 'o_prj'" in m["unknown"]
        assert "Close matches: ['o_proj'" in m["unknown"]
        assert ("series 'o_proj' mixes different layers: layers.0.o_proj has weight [8, 8] float32, bias [8] float32 "
                "but layers.2.o_proj has weight [8, 16] float32") in m["shapes"]
        assert "prefetch_step=2 is out of range for series 'o_proj', which has 2 layer(s): use 0..1" in m["step"]
        assert "name the linear layer itself" in m["parent"]
        assert "matches both 'o_proj' and 'self_attn.o_proj'" in m["overlap"]
        assert "ShardingError: DeepSeekShapedStack is already sharded (series ['o_proj'])" in m["twice"]
        assert "RankMismatchError: ranks disagree on the sharding plan" in m["mismatch"]
        assert "rank 0 and rank(s) [1] differ" in m["mismatch"]


def _world_one_case(rank, world):
    try:
        ac.shard_model(build_stack(StackShape(layers=2)), ac.SharedWeightConfig(layers=["o_proj"]))
    except ac.ShardingError as e:
        return str(e)
    return "no error"


def test_world_size_one_is_refused():
    (msg,) = run_fresh(_world_one_case, 1)
    assert "world size 1: there is no other rank to share weights with" in msg


# Other backends: plain Inductor is refused, eager and aot_eager stay correct (tests/test_stock_backends.py)


def _default_device_case(rank, world, step):
    """The model on the CPU, the default device elsewhere (meta) while sharding and running: every
    tensor the project makes must take its device from the model's own tensors."""
    torch._dynamo.reset()
    shape = StackShape(layers=4)
    x = make_input(shape)
    ref = build_stack(shape)(x)
    model = build_stack(shape)
    devices = {name: p.device for name, p in model.named_parameters()}
    with torch.device("meta"):  # what torch.set_default_device("meta") sets
        plan = ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=step))
        eager = model(x)
        compiled = torch.compile(model, backend="ascend_compile", fullgraph=True,
                                 options={"lowering": "aot_eager"})
        outs = [compiled(x) for _ in range(3)]  # the windows sent for the next forward, taken twice
    modules = dict(model.named_modules())
    standins = {}
    for sp in plan.params:
        p = getattr(modules[sp.module].parametrizations, sp.param).original
        if sp.owner != rank:
            standins[f"{sp.module}.{sp.param}"] = (str(p.device), str(devices[f"{sp.module}.{sp.param}"]),
                                                   is_standin(p))
    return {"standins": standins, "eager": torch.equal(eager, ref), "compiled": [torch.equal(o, ref) for o in outs],
            "devices": sorted({str(t.device) for t in [eager, *outs]})}


@pytest.mark.parametrize("step", [1, "auto"])
def test_standins_and_buffers_take_the_models_device_not_the_default_one(step):
    # "auto" measures the link at shard time with buffers on the weights' device
    for rank, r in enumerate(run_ranks(_default_device_case, 2, step)):
        assert r["standins"], "no layer is a stand-in on this rank"
        for name, (device, expected, standin) in r["standins"].items():
            assert device == expected, f"rank {rank}: stand-in of {name} on {device}, its parameter was on {expected}"
            assert standin, name
        assert r["devices"] == ["cpu"]
        assert r["eager"] and all(r["compiled"]), r
