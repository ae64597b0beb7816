"""A stand-in for graph capture (CUDA graphs, ACL graphs: ``torch.npu.NPUGraph``, torchair's
``reduce-overhead``), for tests on CPU.

``Capture(fn, *inputs)`` runs ``fn`` once and records every op it dispatches, down to the aten ops
inside this project's custom ops (their Python bodies run only then, as a custom op's host code runs
only while a device graph is captured; ``slice_state.capturing()`` says True meanwhile, as
``torch.npu``/``torch.cuda.is_current_stream_capturing()`` do on a device), and every collective ``torch.distributed`` issues, as one
task each (an HCCL/NCCL kernel in a device graph; gloo's own host work inside it is not recorded). ``replay()`` runs the recorded ops again, and
only them, on the same memory: the inputs, every intermediate and the outputs are static buffers
(copy new inputs into ``inputs`` first, as vLLM copies a batch into its captured graph's buffers).

What the real capture refuses, this refuses at capture, raising ``CaptureError``: a host sync
(``.item()``, ``.tolist()``, ``bool(t)``, data-dependent shapes: ``aten._local_scalar_dense``,
``aten.nonzero``, ...). What it cannot refuse, it gets wrong as the device would: a decision made
in Python from anything but the captured shapes is frozen at its captured value, and a replay
after that value changed gives the captured path's result, not the new one's.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# aten ops that read a device value on the host (a sync), or whose output shape depends on one:
# stream capture fails on them (cudaErrorStreamCaptureUnsupported; on Ascend, aclmdlRICaptureEnd fails)
HOST_SYNCS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "allclose", "masked_select", "unique",
              "_unique2", "item")
# ops that are kernels (a task each in a captured graph); any other op is a custom op whose host code
# runs at capture and whose kernels are recorded
KERNELS = ("aten", "prims", "_c10d_functional", "c10d", "air", "npu")


class CaptureError(RuntimeError):
    """An op that graph capture refuses."""


# the collectives a captured graph holds as tasks
COLLECTIVES = ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


class _Collective:
    """A collective, recorded as one task: replayed by calling it again, synchronously."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        self.fn(*args, **dict(kwargs, async_op=False))

    def __str__(self):
        return f"dist.{self.fn.__name__}"


class _Work:
    """A recorded collective's work: waiting on it runs the backend's host work, unrecorded."""

    def __init__(self, work, recorder):
        self.work, self.recorder = work, recorder

    def wait(self, *args):
        with self.recorder.paused():
            return self.work.wait(*args)


class _Recorder(TorchDispatchMode):
    supports_higher_order_operators = True  # AOTAutograd's with_effects, around ordered-effect ops

    def __init__(self):
        super().__init__()
        self.ops: list = []  # (func, args, kwargs, outputs)
        self.pause = 0

    @contextlib.contextmanager
    def paused(self):
        self.pause += 1
        try:
            yield
        finally:
            self.pause -= 1

    @contextlib.contextmanager
    def collectives(self):
        """``torch.distributed``'s collectives, each recorded as one task."""
        originals = {name: getattr(dist, name) for name in COLLECTIVES}

        def recording(fn):
            @functools.wraps(fn)
            def call(*args, **kwargs):
                self.ops.append((_Collective(fn), args, {k: v for k, v in kwargs.items() if k != "async_op"}, None))
                with self.paused():
                    work = fn(*args, **kwargs)
                return _Work(work, self) if work is not None else None
            return call

        for name, fn in originals.items():
            setattr(dist, name, recording(fn))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pause:
            return func(*args, **kwargs)
        if isinstance(func, torch._ops.HigherOrderOperator):
            if func.name() != "with_effects":
                return NotImplemented
            _token, op, *rest = args  # the token only orders the calls: a captured graph keeps its order
            with self:
                out = op(*rest, **kwargs)
            return (torch.tensor([]), *out) if isinstance(out, tuple) else (torch.tensor([]), out)
        name = func.__name__.split(".")[0]
        if func.namespace == "aten" and name in HOST_SYNCS:
            raise CaptureError(f"{func} reads a device value on the host (a sync) inside a captured graph; "
                               "graph capture refuses it")
        if func.namespace not in KERNELS:  # its host code runs now, its kernels are what a replay runs
            for key in ("CompositeExplicitAutograd", "CPU"):
                if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
                    with self:
                        return func._op_dk(getattr(torch._C.DispatchKey, key), *args, **kwargs)
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class Capture:
    """``fn(*inputs)`` captured once; ``replay()`` runs its ops again on the same buffers."""

    def __init__(self, fn, *inputs):
        self.inputs = inputs
        self.recorder = _Recorder()
        from ascend_compile.runtime import slice_state

        capturing = slice_state.capturing
        slice_state.capturing = lambda: True  # what the device says while it captures
        try:
            with self.recorder, self.recorder.collectives():
                self.output = fn(*inputs)
        finally:
            slice_state.capturing = capturing
        self.ops = self.recorder.ops

    def op_names(self) -> list:
        return [str(f) for f, _, _, _ in self.ops]

    def replay(self):
        """Run the captured ops again; returns the output buffers (overwritten at the next replay)."""
        for func, args, kwargs, captured in self.ops:
            result = func(*args, **kwargs)
            if getattr(func, "namespace", None) == "_c10d_functional" and func.__name__.split(".")[0] != "wait_tensor":
                # a functional collective's output is written when it is waited on: wait before it is copied
                # where the captured one wrote (the captured wait_tensor then finds nothing in flight)
                for t in tree_flatten(result)[0]:
                    if isinstance(t, torch.Tensor):
                        torch.ops._c10d_functional.wait_tensor(t)
            new, _ = tree_flatten(result)
            old, _ = tree_flatten(captured)
            for n, o in zip(new, old):
                if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) and n is not o and o.numel() \
                        and not (n.data_ptr() == o.data_ptr() and n.stride() == o.stride()):
                    o.copy_(n)  # the captured op writes where it wrote at capture
        return self.output
