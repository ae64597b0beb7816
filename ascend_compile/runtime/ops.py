"""The shared-weight marker op.

``ascend_compile::shared_weight(Tensor w, str series, int index, int owner, str group_name,
int prefetch_step, int wrap_windows=0, int layers=0, int generation=0) -> Tensor`` stands for "the full value of layer ``index`` of ``series``,
whose real storage lives on group rank ``owner``". Every read of a shared parameter goes
through it, so the sharded model is one program for eager forwards and our compiler:

- eagerly it is a synchronous broadcast from the owner into a fresh buffer: correct, not
  overlapped. Inside a graph plain Inductor compiled, it refuses (``opaque.check_read``): Inductor
  reorders the reads (differently on each rank) and with freezing folds them at compile time;
- our backend rewrites it into functional ``broadcast`` + ``wait_tensor`` and schedules them.

A placeholder therefore never reaches a matmul: the only way to the weight is the op.
``prefetch_step`` is a scheduling hint carried in the IR so that a graph says how it wants
to be scheduled and a change of step changes the graph (and every cache key); so are
``wrap_windows`` (layers of the series prefetched across steps, 0 for none) and ``layers`` (the
series' length, so a graph can tell whether it holds the whole series) and ``generation`` (which
sharding over the group the weight belongs to: what it agreed on is looked up by it): each model
carries its own, even when several models share one process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import formats, opaque, state
from .groups import group_from_name
from .marker import OP_NAME, OP_NAMESPACE, layer_name
from .windows import eager_read


@torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}", mutates_args=())
def shared_weight(
    w: torch.Tensor, series: str, index: int, owner: int, group_name: str, prefetch_step: int,
    wrap_windows: int = 0, layers: int = 0, generation: int = 0,
) -> torch.Tensor:
    def read_sync() -> torch.Tensor:
        pg = group_from_name(group_name)
        if dist.get_rank(pg) == owner:
            out = w.clone(memory_format=torch.contiguous_format)
        else:
            fmt = state.get(group_name, generation).formats.get(layer_name(series, index))
            out = formats.empty_in_format(w.shape, w.dtype, w.device, fmt)
        try:
            dist.broadcast(out, group_src=owner, group=pg)
        except Exception as e:
            from .errors import is_comm_failure
            from .failing import peer_error

            if not is_comm_failure(e):
                raise
            raise peer_error(f"the broadcast of {layer_name(series, index)} from rank {owner}", group_name, e) from e
        return out

    key = opaque.weight_key(group_name, generation, layer_name(series, index))
    fetched = opaque.lookup(key)
    if fetched is not None:  # inside fetch_layers: fetched once where the opaque op started
        return fetched
    opaque.check_read(key)
    if wrap_windows > 0:  # the windows a compiled forward would use and send (wrap-around)
        return eager_read(w, series, index, owner, group_name, wrap_windows, read_sync)
    return read_sync()


@shared_weight.register_fake
def _(w, series, index, owner, group_name, prefetch_step, wrap_windows=0, layers=0, generation=0):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


@torch.library.custom_op(f"{OP_NAMESPACE}::receive_buffer", mutates_args=())
def receive_buffer(size: list[int], dtype: torch.dtype, device: torch.device, npu_format: int) -> torch.Tensor:
    """An uninitialised buffer for a broadcast, in the owner's storage format (aclFormat int; a
    row-major one gives a plain ``empty``). Our passes insert it for weights stored in FRACTAL_NZ."""
    return formats.empty_in_format(size, dtype, device, npu_format)


@receive_buffer.register_fake
def _(size, dtype, device, npu_format):
    return torch.empty(size, dtype=dtype, device=device)


def shared_weight_targets() -> tuple:
    """The FX call targets that mean the marker: Dynamo graphs may hold the overload packet."""
    packet = getattr(torch.ops, OP_NAMESPACE).shared_weight
    return (packet, packet.default)
