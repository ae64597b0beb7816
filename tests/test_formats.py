"""Receive buffers in the owner's NPU storage format (FRACTAL_NZ), against a fake torch_npu format API.

The fake keeps a format per tensor (by storage pointer) on CPU: ``npu_format_cast`` marks a
tensor, ``get_npu_format`` reads the mark (ND when unmarked), ``empty_with_format`` makes a
marked empty tensor and logs the call. ``formats.NPU_DEVICE_TYPE`` is pointed at "cpu" so the
project asks the fake about CPU tensors as it would ask torch_npu about NPU ones.
"""

import sys
import types

import pytest
import torch

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ranks import run_ranks

FRACTAL_NZ, FRACTAL_Z = 29, 4


class FakeFormats(types.ModuleType):
    def __init__(self):
        super().__init__("torch_npu")
        self.marks, self.allocated = {}, []

    def npu_format_cast(self, t, fmt):
        self.marks[t.untyped_storage().data_ptr()] = fmt
        return t

    def get_npu_format(self, t):
        return self.marks.get(t.untyped_storage().data_ptr(), 2)

    def empty_with_format(self, size, dtype=None, device=None, acl_format=2):
        t = torch.empty(size, dtype=dtype, device=device)
        self.allocated.append((tuple(size), acl_format))
        return self.npu_format_cast(t, acl_format)


def _install():
    from ascend_compile.runtime import formats

    fake = FakeFormats()
    saved = (sys.modules.get("torch_npu"), formats.NPU_DEVICE_TYPE)
    sys.modules["torch_npu"] = fake
    formats.NPU_DEVICE_TYPE = "cpu"
    return fake, saved


def _uninstall(saved):
    from ascend_compile.runtime import formats

    if saved[0] is None:
        sys.modules.pop("torch_npu", None)
    else:
        sys.modules["torch_npu"] = saved[0]
    formats.NPU_DEVICE_TYPE = saved[1]


def _nz_case(rank, world, lowering, fmt):
    fake, saved = _install()
    try:
        torch._dynamo.reset()
        shape = StackShape(layers=4)
        x = make_input(shape)
        ref = build_stack(shape)(x)
        ref_compiled = torch.compile(build_stack(shape), backend=lowering)(x)  # same kernels, unsharded
        model = build_stack(shape)
        # what processing does on an NPU: the o_proj weights are cast to NZ on every rank before
        # sharding (vLLM-Ascend: process_weights_after_loading on the owner)
        for layer in model.layers:
            fake.npu_format_cast(layer.self_attn.o_proj.weight, fmt)
        try:
            plan = ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj", "q_b_proj"], prefetch_step=1))
        except ac.ShardingError as e:
            return {"error": str(e)}
        eager = model(x)
        eager_allocs = list(fake.allocated)
        fake.allocated.clear()
        fn = torch.compile(model, backend="ascend_compile", fullgraph=True,
                           options={"lowering": lowering, "dump_dir": None})
        out = fn(x)
        return {
            "formats": plan.formats, "eager": torch.equal(eager, ref), "compiled": torch.equal(out, ref_compiled),
            "eager_allocs": eager_allocs, "compiled_allocs": list(fake.allocated),
        }
    finally:
        _uninstall(saved)


@pytest.mark.parametrize("lowering", ["aot_eager", "inductor"])
def test_nz_weights_are_received_into_nz_buffers(lowering):
    for rank, r in enumerate(run_ranks(_nz_case, 2, lowering, FRACTAL_NZ)):
        assert r["formats"] == {f"o_proj.weight[{i}]": FRACTAL_NZ for i in range(4)}  # every rank knows all owners'
        assert r["eager"] and r["compiled"]
        not_owned = [i for i in range(4) if i % 2 != rank]
        o_proj = (64, 96)  # o_proj weight: hidden x heads*v_dim
        # one NZ buffer per o_proj layer this rank receives; q_b_proj (ND) in plain buffers
        assert r["eager_allocs"] == [(o_proj, FRACTAL_NZ)] * len(not_owned)
        # compiled, layer 0 comes from a window (wrap-around) that every rank, its owner too, allocates
        # in NZ: once at the first forward's entry, once for the next forward
        received = [i for i in not_owned if i != 0]
        assert r["compiled_allocs"] == [(o_proj, FRACTAL_NZ)] * (len(received) + 2)


def test_a_format_we_cannot_reproduce_is_refused_on_every_rank():
    for r in run_ranks(_nz_case, 2, "aot_eager", FRACTAL_Z):
        assert r["error"].startswith("o_proj.weight[0] is stored in format FRACTAL_Z on its owner; receive buffers "
                                     "can only be made in ['NCHW', 'NHWC', 'ND', 'FRACTAL_NZ']")
        assert "Leave this series out" in r["error"]


def test_rewrite_puts_nz_buffers_on_non_owners_only():
    from ascend_compile.passes import rewrite_shared_weights
    from graphs import plan, stack_graph

    nz = (("o_proj.weight[1]", FRACTAL_NZ), ("o_proj.weight[2]", FRACTAL_NZ))
    buffer_op = torch.ops.ascend_compile.receive_buffer.default
    for inplace in (True, False):
        for rank in (0, 1):
            p = plan(rank=rank, inplace=inplace)
            p = type(p)(**{**p.__dict__, "formats": nz})
            gm = rewrite_shared_weights(stack_graph(4, ("o_proj",), 1), p)
            made = [n.args for n in gm.graph.nodes if n.target is buffer_op]
            # layer 1 is owned by rank 1, layer 2 by rank 0: each rank receives one NZ layer
            assert made == [([8, 8], torch.float32, torch.device("cpu"), FRACTAL_NZ)], (inplace, rank, made)
            for n in gm.graph.nodes:
                if n.target is buffer_op:
                    (issue,) = n.users
                    assert "broadcast" in str(issue.target)
                    assert issue.args[0] is n  # the broadcast receives into (or clones) the NZ buffer


def test_torchair_converts_the_buffer_through_its_own_empty_with_format():
    import fake_torchair

    from ascend_compile.lowering import torchair as lowering

    air = fake_torchair.install()
    try:
        lowering.register_converters(air)
        registry = sys.modules["torchair._ge_concrete_graph.fx2ge_converter"]._CONVERTERS
        convert = registry[torch.ops.ascend_compile.receive_buffer.default]
        with pytest.raises(RuntimeError, match="no converter for npu.empty_with_format"):
            convert([8, 8], torch.float16, torch.device("cpu"), FRACTAL_NZ)
        calls = []

        class Op:  # stands for torch.ops.npu.empty_with_format.default as torchair registers it
            pass

        npu = types.SimpleNamespace(empty_with_format=types.SimpleNamespace(default=Op))
        registry[Op] = lambda size, **kw: calls.append((size, kw)) or "ge tensor"
        torch.ops.npu = npu
        try:
            assert convert([8, 8], torch.float16, torch.device("cpu"), FRACTAL_NZ) == "ge tensor"
        finally:
            del torch.ops.npu
        assert calls == [([8, 8], {"dtype": torch.float16, "device": torch.device("cpu"),
                                   "acl_format": FRACTAL_NZ, "meta_outputs": None})]
    finally:
        fake_torchair.uninstall()
