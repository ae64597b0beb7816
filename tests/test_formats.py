"""Receive buffers in the owner's NPU storage format (FRACTAL_NZ), against a fake torch_npu format API.

The fake keeps a format per storage on CPU, and its NZ bytes are not ND bytes: ``npu_format_cast``
(in place here) rewrites a tensor's elements in another order (reversed, standing for NZ's tiles) and
marks its storage; ``get_npu_format`` reads the mark (ND when unmarked); ``empty_with_format``
makes a marked empty tensor and logs the call; ``torch.ops.fake_npu.nz_read`` reads a weight the
way an NPU kernel would, by its storage's format. As torch_npu's, ``Tensor.clone`` keeps the format
and ``Tensor.copy_`` between formats converts (both patched while the fake is installed); only a
collective moves raw bytes. The sharded model's ``o_proj`` layers read their weight through
``nz_read``, so NZ bytes broadcast into an ND buffer (or ND bytes into an NZ one) give wrong
outputs, as on the device, instead of equal values. Marked storages are kept alive, so a freed
address cannot pass its mark on. ``formats.NPU_DEVICE_TYPE`` is pointed at "cpu" so the project
asks the fake about CPU tensors as it would ask torch_npu about NPU ones.
"""

import sys
import types

import pytest
import torch

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ranks import run_ranks

FRACTAL_NZ, FRACTAL_Z, ND = 29, 4, 2
_ACTIVE: list = [None]  # the installed FakeFormats, for nz_read
_CLONE, _COPY = torch.Tensor.clone, torch.Tensor.copy_


def _reorder(t: torch.Tensor) -> torch.Tensor:
    """The fake's NZ byte order: the elements reversed (its own inverse)."""
    return t.detach().flatten().flip(0).reshape(t.shape)


class FakeFormats(types.ModuleType):
    def __init__(self):
        super().__init__("torch_npu")
        self.marks, self.allocated, self.keep = {}, [], []

    def _mark(self, t, fmt):
        self.keep.append(t.untyped_storage())  # alive: its address is never reused with a stale mark
        self.marks[t.untyped_storage().data_ptr()] = fmt

    def npu_format_cast(self, t, fmt):
        """In place (processing on the device leaves the parameter in ``fmt``): ND <-> another format
        reorders the elements."""
        if (self.get_npu_format(t) == ND) != (fmt == ND):
            with torch.no_grad():
                _COPY(t, _reorder(t))
        self._mark(t, fmt)
        return t

    def get_npu_format(self, t):
        if type(t) not in (torch.Tensor, torch.nn.Parameter):  # fake tensors while tracing: no storage
            return ND
        return self.marks.get(t.untyped_storage().data_ptr(), ND)

    def clone(self, t, *args, **kwargs):  # torch_npu: the clone has the source's format
        out = _CLONE(t, *args, **kwargs)
        if self.get_npu_format(t) != ND:
            self._mark(out, self.get_npu_format(t))
        return out

    def copy_(self, dst, src, *args, **kwargs):  # torch_npu: a copy between formats converts
        _COPY(dst, src, *args, **kwargs)
        if (self.get_npu_format(dst) == ND) != (self.get_npu_format(src) == ND):
            with torch.no_grad():
                _COPY(dst, _reorder(dst))
        return dst

    def empty_with_format(self, size, dtype=None, device=None, acl_format=ND):
        t = torch.empty(size, dtype=dtype, device=device)
        self.allocated.append((tuple(size), acl_format))
        self._mark(t, acl_format)
        return t


def _define_nz_read():
    if hasattr(torch.ops, "fake_npu") and hasattr(torch.ops.fake_npu, "nz_read"):
        return

    @torch.library.custom_op("fake_npu::nz_read", mutates_args=())
    def nz_read(w: torch.Tensor) -> torch.Tensor:
        """``w``'s values as a kernel on the device reads them: by the format of its storage."""
        return _reorder(w).clone() if _ACTIVE[0].get_npu_format(w) != ND else w.clone()

    @nz_read.register_fake
    def _(w):
        return torch.empty_like(w)


def _read_o_proj_by_format(model):
    """Every o_proj of ``model`` reads its weight through ``fake_npu::nz_read``."""
    import torch.nn.functional as F

    for layer in model.layers:
        proj = layer.self_attn.o_proj
        proj.forward = lambda x, proj=proj: F.linear(x, torch.ops.fake_npu.nz_read(proj.weight), proj.bias)


def _install():
    from ascend_compile.runtime import formats

    _define_nz_read()
    fake = FakeFormats()
    saved = (sys.modules.get("torch_npu"), formats.NPU_DEVICE_TYPE, _ACTIVE[0])
    sys.modules["torch_npu"] = fake
    formats.NPU_DEVICE_TYPE = "cpu"
    _ACTIVE[0] = fake
    torch.Tensor.clone = lambda t, *a, **k: fake.clone(t, *a, **k)
    torch.Tensor.copy_ = lambda dst, src, *a, **k: fake.copy_(dst, src, *a, **k)
    return fake, saved


def _uninstall(saved):
    from ascend_compile.runtime import formats

    if saved[0] is None:
        sys.modules.pop("torch_npu", None)
    else:
        sys.modules["torch_npu"] = saved[0]
    formats.NPU_DEVICE_TYPE = saved[1]
    _ACTIVE[0] = saved[2]
    torch.Tensor.clone, torch.Tensor.copy_ = _CLONE, _COPY


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
            # wrap-around explicitly: its default is off where torch_npu is importable (the fake is)
            config = ac.SharedWeightConfig(layers=["o_proj", "q_b_proj"], prefetch_step=1, wrap_around=True)
            plan = ac.shard_model(model, config)
        except ac.ShardingError as e:
            return {"error": str(e)}
        _read_o_proj_by_format(model)  # NZ bytes are read as NZ, ND bytes as ND
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
        o_proj = (64, 96)  # o_proj weight: hidden x heads*v_dim
        # one NZ buffer per o_proj layer 1..3 this rank receives; q_b_proj (ND) in plain buffers. Layer 0
        # comes from a window (wrap-around) that every rank, its owner too, allocates in NZ: the eager
        # forward fetches it at entry and sends it for the next forward, which is the compiled one
        received = [i for i in range(1, 4) if i % 2 != rank]
        assert r["eager_allocs"] == [(o_proj, FRACTAL_NZ)] * (1 + len(received) + 1)
        assert r["compiled_allocs"] == [(o_proj, FRACTAL_NZ)] * (len(received) + 1)


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


def _sliced_nz_case(rank, world):
    fake, saved = _install()
    try:
        model = build_stack(StackShape(layers=2))
        for layer in model.layers:
            fake.npu_format_cast(layer.self_attn.o_proj.weight, FRACTAL_NZ)
        try:
            ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj", "q_b_proj"], layout="slices", decode_tokens=1))
        except ac.ConfigError as e:
            return str(e)
        return None
    finally:
        _uninstall(saved)


def test_slices_refuse_nz_weights_on_every_rank():
    for got in run_ranks(_sliced_nz_case, 2):
        assert got is not None and got.startswith("o_proj.weight[0] is stored in FRACTAL_NZ, whose tiles cannot be "
                                                  "cut into slices: use SharedWeightConfig(layout='layers')"), got
