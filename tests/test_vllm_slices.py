"""``layout="slices"`` through vLLM's loader on CPU gloo ranks: each rank loads only its slice of every
layer, vLLM's own layers compute through ``sliced_linear``, and what cannot be sliced is refused."""

import functools

import pytest
import torch

import ascend_compile as ac
from ascend_compile.config import ConfigError
from ranks import run_ranks

# vLLM is not an extra of ours (its wheels pin torch): scripts/install.sh builds .venv-vllm, where
# scripts/test.sh runs these files; there a missing vLLM fails, never skips
import vllm  # noqa: E402,F401

# q_b_proj, kv_b_proj, o_proj: output cut (d_in <= d_out); down_proj: input cut (96 > 64)
SLICED = ["q_b_proj", "kv_b_proj", "o_proj", "down_proj"]


def _load(rank, world, shared: dict, create_model, checkpoint: dict, device: str = "cpu"):
    """Load through vLLM's ``BaseModelLoader.load_model`` (wrapped by our plugin) from ``checkpoint``
    (name -> whole tensor), with ``additional_config["ascend_compile"]["shared_weight"] = shared``.
    Returns ``(model, {param name: the checkpoint tensor its weight loader was given})``."""
    from types import SimpleNamespace
    from unittest import mock

    import vllm._custom_ops as ops
    import vllm_model
    from vllm.config import CompilationConfig, DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    from ascend_compile.integrations import vllm as integ

    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"),
                     additional_config={"ascend_compile": {"shared_weight": shared}},
                     compilation_config=CompilationConfig(mode=2, backend="ascend_compile"))
    given = {}
    with set_current_vllm_config(cfg):
        vllm_model.init_model_parallel(rank, world)
        integ.register()

        class Loader(BaseModelLoader):
            def download_model(self, model_config):
                pass

            def load_weights(self, model, model_config):
                for name, p in model.named_parameters():
                    loader = getattr(p, "weight_loader", None)
                    if not isinstance(loader, functools.partial):  # not ours: the unsharded layers
                        loader = default_weight_loader
                    given[name] = tuple(checkpoint[name].shape)
                    loader(p, checkpoint[name])

        model_config = SimpleNamespace(dtype=torch.float32, hf_config=None, word_embeddings_untied_by_checkpoint=False,
                                       quantization=None)
        # the plain GEMM for every unsharded layer (vLLM CPU's oneDNN handles off), as vllm_model.build
        with mock.patch("vllm.model_executor.model_loader.base_loader.initialize_model", create_model), \
                mock.patch.object(ops, "_supports_onednn", False), torch.device(device):
            model = Loader(LoadConfig()).load_model(cfg, model_config)
    return model, given


def _sliced_case(rank, world, decode_tokens):
    """Load the DeepSeek-shaped stack of vLLM layers with ``SLICED`` as slices (under a meta default
    device: vLLM builds on its device, and the slices must take the model's), then run decode-sized and prefill-sized
    forwards with a different token count on each rank, eagerly and compiled."""
    import vllm_model

    _, ctx = vllm_model.setup_vllm(rank, world)  # vLLM's layers are built and run inside a vLLM config
    try:
        return _sliced_run(rank, world, decode_tokens)
    finally:
        ctx.__exit__(None, None, None)


def _sliced_run(rank, world, decode_tokens):
    import vllm_model

    torch._dynamo.reset()
    reference = vllm_model.build()
    checkpoint = {k: v.clone() for k, v in vllm_model.build(processed=False).state_dict().items()}
    shared = {"layers": SLICED, "layout": "slices", "decode_tokens": decode_tokens}
    model, given = _load(rank, world, shared, lambda vllm_config, model_config, prefix="": vllm_model.VllmStack(4),
                         checkpoint, device="meta")
    plan = ac.get_plan(model)
    sliced = {n: m for n, m in model.named_modules() if n.endswith(tuple(SLICED))}
    slices_ok = True
    for name, m in sliced.items():
        whole, cut = m._ascend_compile_presliced["whole"], m._ascend_compile_presliced["cut"]
        size = whole[cut] // world
        expected = checkpoint[f"{name}.weight"].narrow(cut, rank * size, size)
        slices_ok &= torch.equal(m.weight, expected) and m.weight.untyped_storage().nbytes() == expected.numel() * 4
        slices_ok &= given[f"{name}.weight"] == whole  # the loader was handed the checkpoint tensor, whole
    out = {"plan": (plan.layout, plan.world_size, plan.decode_tokens), "saved": plan.saved_bytes(),
           "series": plan.series_bytes(), "slices": slices_ok,
           "methods": sorted({type(m.quant_method).__name__ for m in sliced.values()}),
           "held": sum(m.weight.untyped_storage().nbytes() for m in sliced.values())}
    state = ac.runtime.state.of_model(model).slices
    compiled = torch.compile(model, backend="ascend_compile", fullgraph=True, options={"lowering": "inductor"})
    # decode: 1 and 3 tokens (agreed 3 <= decode_tokens); prefill: 2 and 9 (agreed 9 > decode_tokens)
    for phase, tokens in (("decode", (1, 3)), ("prefill", (2, 9))):
        g = torch.Generator().manual_seed(10 + rank)
        n = tokens[rank]
        positions, x = torch.arange(n), torch.randn(n, vllm_model.HIDDEN, generator=g)
        ref = reference(positions, x)
        before = dict(state.forwards)
        with torch.inference_mode():  # as vLLM runs its forwards
            eager = model(positions, x)
            got = compiled(positions, x)
        out[phase] = {
            "eager": float(((eager - ref).abs().max() / ref.abs().max())),
            "compiled": float(((got - ref).abs().max() / ref.abs().max())),
            "paths": {p: state.forwards[p] - before[p] for p in before},
        }
    return out


def test_vllm_layers_load_only_their_slice_and_compute_both_paths_as_unsharded():
    """Each rank's weight loader gets every checkpoint tensor whole and keeps only its slice (the
    layer holds 1/2 of its bytes, equal to the checkpoint's narrowed block), vLLM's layers compute
    through ``SlicedLinearMethod``, and forwards where the ranks have 1 and 3 tokens (slices path,
    decode_tokens=4) and 2 and 9 tokens (gather path) equal the unsharded vLLM stack on every rank,
    eagerly and compiled by our backend."""
    results = run_ranks(_sliced_case, 2, 4, timeout=600)
    for rank, r in enumerate(results):
        assert r["plan"] == ("slices", 2, 4)
        assert r["slices"], rank
        assert r["methods"] == ["SlicedLinearMethod"]
        assert r["saved"] == r["series"] // 2 and r["held"] == r["series"] // 2
        for phase in ("decode", "prefill"):
            assert r[phase]["eager"] < 1e-5 and r[phase]["compiled"] < 1e-5, (rank, phase, r[phase])
            # both forwards (eager, compiled) took the path every rank agreed on
            assert r[phase]["paths"] == {"slices": 2 * (phase == "decode"), "gather": 2 * (phase == "prefill")}


def _quant_case(rank, world, decode_tokens):
    import vllm_model

    _, ctx = vllm_model.setup_vllm(rank, world)
    try:
        return _quant_run(rank, world, decode_tokens)
    finally:
        ctx.__exit__(None, None, None)


def _quant_run(rank, world, decode_tokens):
    import vllm_model
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    torch._dynamo.reset()
    quant = vllm_model.int8_channel_config()
    checkpoint = vllm_model.quant_slice_checkpoint(3)
    reference = vllm_model.QuantSliceStack(3, quant)
    for name, p in reference.named_parameters():
        default_weight_loader(p, checkpoint[name])
    vllm_model.process(reference)
    shared = {"layers": ["q_b_proj", "o_proj"], "layout": "slices", "decode_tokens": decode_tokens}
    model, given = _load(rank, world, shared,
                         lambda vllm_config, model_config, prefix="": vllm_model.QuantSliceStack(3, quant), checkpoint,
                         device="meta")
    plan = ac.get_plan(model)
    layer = model.layers[1]
    q_scale = checkpoint["layers.1.q_b_proj.weight_scale"]
    out = {
        "plan": (plan.layout, plan.decode_tokens), "explanation": plan.decode_explanation,
        "saved": plan.saved_bytes(), "series": plan.series_bytes(),
        "params": sorted((p.param, p.shape) for p in plan.params if p.index == 0),
        "methods": sorted({type(m["q_b_proj"].quant_method).__name__ for m in model.layers}),
        # processed on the slice: q_b_proj [in, out/2], o_proj [in/2, out] (transposed by processing)
        "weights": [tuple(layer["q_b_proj"].weight.shape), tuple(layer["o_proj"].weight.shape)],
        "q_b_slice": torch.equal(layer["q_b_proj"].weight,
                                 checkpoint["layers.1.q_b_proj.weight"][rank * 64:(rank + 1) * 64].t()),
        "o_slice": torch.equal(layer["o_proj"].weight,
                               checkpoint["layers.1.o_proj.weight"][:, rank * 64:(rank + 1) * 64].t()),
        "scales": [torch.equal(layer["q_b_proj"].weight_scale, q_scale[rank * 64:(rank + 1) * 64]),
                   torch.equal(layer["o_proj"].weight_scale, checkpoint["layers.1.o_proj.weight_scale"]),
                   torch.equal(layer["o_proj"].bias, checkpoint["layers.1.o_proj.bias"])],
        "whole_given": all(given[k] == tuple(v.shape) for k, v in checkpoint.items()),
    }
    compiled = torch.compile(model, backend="ascend_compile", fullgraph=True, options={"lowering": "inductor"})
    for phase, tokens in (("few", (1, 3)), ("many", (2, 9))):
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(tokens[rank], vllm_model.HIDDEN, generator=g)
        ref = reference(x)
        with torch.inference_mode():
            eager, got = model(x), compiled(x)
        out[phase] = [float((t - ref).abs().max() / ref.abs().max()) for t in (eager, got)]
    state = ac.runtime.state.of_model(model).slices
    out["gathers"] = [e for e in state.issued if e.startswith("gather")]
    return out


@pytest.mark.parametrize("decode_tokens", [4, "auto"])
def test_an_int8_series_loads_processes_and_computes_on_its_slices(decode_tokens):
    """vLLM layers quantized by a method that declares its parameters' dimensions (int8 weight,
    per-output-channel scale): the weight and the scales along the cut are loaded as slices through
    the layer's own weight loader, processed by the method on the slice (transposed here), and the
    method computes on the slice inside ``sliced_linear``, at every token count (a processed layout is
    never gathered): equal to the unsharded int8 stack within 1e-5, eagerly and compiled, with ranks
    of 1 and 3, then 2 and 9 tokens."""
    for rank, r in enumerate(run_ranks(_quant_case, 2, decode_tokens, timeout=600)):
        assert r["methods"] == ["SlicedQuantMethod"]
        assert r["weights"] == [(64, 64), (64, 64)]
        assert r["q_b_slice"] and r["o_slice"] and r["scales"] == [True, True, True], rank
        assert r["whole_given"]
        # cut: both weights and q_b_proj's scale (output cut); o_proj's scale and bias stay whole
        assert r["params"] == [("weight", (64, 128)), ("weight", (128, 64)), ("weight_scale", (128,))]
        assert r["series"] == 3 * (128 * 64 + 128 * 4 + 64 * 128) and r["saved"] == r["series"] // 2
        for phase in ("few", "many"):
            assert max(r[phase]) < 1e-5, (rank, phase, r[phase])
        assert r["gathers"] == []
        if decode_tokens == "auto":
            assert r["plan"] == ("slices", 0) and "computes on its slices at every token count" in r["explanation"]


def _refused_case(rank, world, what):
    import vllm_model

    _, ctx = vllm_model.setup_vllm(rank, world)
    try:
        return _refused_run(rank, world, what)
    finally:
        ctx.__exit__(None, None, None)


def _refused_run(rank, world, what):
    import vllm_model

    if what == "quantized":
        build, layers = (lambda vllm_config, model_config, prefix="": vllm_model.QuantStack(3)), ["o_proj"]
        source = {}
        for name, p in vllm_model.QuantStack(3).named_parameters():
            source[name] = p.data.clone()
    else:  # a merged layer: its checkpoint comes in pieces
        build, layers = (lambda vllm_config, model_config, prefix="": vllm_model.VllmStack(2)), ["gate_up_proj"]
        source = {k: v.clone() for k, v in vllm_model.build(2, processed=False).state_dict().items()}
    try:
        _load(rank, world, {"layers": layers, "layout": "slices", "decode_tokens": 4}, build, source)
    except Exception as e:  # noqa: BLE001 - returned to the test
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("what, message", [
    ("quantized", r"layout='slices' cuts layers\.0\.o_proj \(Int8WeightOnly\) along the dimensions its parameters "
                  r"declare, but its weight declares no input_dim/output_dim: use SharedWeightConfig\(layout='layers'\)"),
    ("merged", r"layers\.0\.gate_up_proj .*it is a MergedColumnParallelLinear.*layout='layers'"),
])
def test_layers_the_slices_cannot_load_are_refused_on_every_rank(what, message):
    import re

    for rank, error in enumerate(run_ranks(_refused_case, 2, what)):
        assert error is not None, f"rank {rank} did not raise"
        assert error.startswith("ConfigError: rank "), error
        assert re.search(message, error), error


def test_tensor_parallel_slices_are_refused_at_config_time():
    from types import SimpleNamespace

    from ascend_compile.integrations.vllm import check_config

    cfg = SimpleNamespace(
        additional_config={"ascend_compile": {"shared_weight": {"layers": ["o_proj"], "layout": "slices"},
                                              "group": "dp"}},
        compilation_config=SimpleNamespace(mode=2, backend="ascend_compile"),
        parallel_config=SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1, data_parallel_size=2,
                                        distributed_executor_backend="external_launcher"),
        model_config=None)
    with pytest.raises(ConfigError, match=r"layout='slices' under vLLM cuts each layer's whole weight, but "
                                          r"tensor_parallel_size=2 .*use layout='layers'"):
        check_config(cfg)
    cfg.parallel_config.tensor_parallel_size = 1
    check_config(cfg)  # accepted


def test_load_slice_refuses_a_checkpoint_tensor_of_another_shape_or_in_pieces():
    from ascend_compile.integrations.vllm.slicing import load_slice

    p = torch.zeros(4, 3)
    load_slice("l.o_proj", (8, 3), 0, 4, 4, p, torch.arange(24.0).view(8, 3))
    assert torch.equal(p, torch.arange(12.0, 24.0).view(4, 3))  # rows 4..7: rank 1's slice
    with pytest.raises(ConfigError, match=r"l\.o_proj: the checkpoint's weight is \[8, 4\], the layer's is \[8, 3\]"):
        load_slice("l.o_proj", (8, 3), 0, 4, 4, p, torch.zeros(8, 4))
    with pytest.raises(ConfigError, match=r"l\.o_proj: its checkpoint weight comes in pieces"):
        load_slice("l.o_proj", (8, 3), 0, 4, 4, p, torch.zeros(8, 3), 0)
