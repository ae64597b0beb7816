"""TEST HARNESS ONLY, not part of ascend_compile: stand-ins for ``DeviceCommunicatorBase.all_gatherv``
and ``reduce_scatterv`` on vLLM 0.23's ``CpuCommunicator`` (loaded by ``sitecustomize`` next to
this file), so that ``vllm serve --data-parallel-size N`` can run a MoE model on CPU.

Plain gloo on the group's ``device_group``: ``all_gatherv`` pads every rank's piece to the largest
along dim 0, all-gathers and cuts each piece back to ``sizes[r]``; ``reduce_scatterv`` all-reduces a
copy and keeps this rank's rows. The contract is ``CudaCommunicator``'s (dim 0 only for
``all_gatherv``; a list in gives a list out).

On CPU vLLM calls the MoE forward directly (not through its opaque ``moe_forward`` op), so Dynamo
traces the dispatch and the per-rank sizes are unbacked SymInts (``num_tokens_across_dp_cpu.tolist()``):
the collectives are custom ops whose fake implementations give the output shapes, and whose real
ones run with the concrete sizes."""

import torch
import torch.distributed as dist


def _gatherv_one(comm, t: torch.Tensor, sizes):
    world, rank = comm.world_size, comm.rank_in_group
    assert len(sizes) == world and t.shape[0] == sizes[rank], (t.shape, sizes, rank)
    most = max(sizes)
    t = t.contiguous()
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros((most - t.shape[0],) + tuple(t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in range(world)]  # gloo: bf16, fp16, fp32, int32, int64, uint8
    dist.all_gather(parts, t, group=comm.device_group)
    return torch.cat([p[: sizes[r]] for r, p in enumerate(parts)])


def _reduce_scatterv_dim0(comm, x: torch.Tensor, sizes):
    rank = comm.rank_in_group
    assert len(sizes) == comm.world_size and x.shape[0] == sum(sizes), (x.shape, sizes)
    x = x.contiguous().clone()  # all_reduce works in place; the caller's tensor must not change
    dist.all_reduce(x, group=comm.device_group)
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]].contiguous()


def _communicator(group_name: str):
    from vllm.distributed.parallel_state import _groups

    group = _groups[group_name]()
    assert group is not None, f"vLLM group {group_name} is gone"
    return group.device_communicator


@torch.library.custom_op("test_vcollectives::all_gatherv", mutates_args=())
def _all_gatherv_op(x: torch.Tensor, sizes: list[int], group_name: str) -> torch.Tensor:
    return _gatherv_one(_communicator(group_name), x, sizes)


@_all_gatherv_op.register_fake
def _(x, sizes, group_name):
    return x.new_empty((sum(sizes),) + tuple(x.shape[1:]))


@torch.library.custom_op("test_vcollectives::reduce_scatterv", mutates_args=())
def _reduce_scatterv_op(x: torch.Tensor, sizes: list[int], rank: int, group_name: str) -> torch.Tensor:
    return _reduce_scatterv_dim0(_communicator(group_name), x, sizes)


@_reduce_scatterv_op.register_fake
def _(x, sizes, rank, group_name):
    return x.new_empty((sizes[rank],) + tuple(x.shape[1:]))


def all_gatherv(self, input_, dim: int = 0, sizes=None):
    if dim != 0:
        raise NotImplementedError("the test stand-in all_gatherv gathers along dim 0 only")

    def one(t):
        s = list(sizes) if sizes is not None else [t.shape[0]] * self.world_size
        return torch.ops.test_vcollectives.all_gatherv(t, s, self.unique_name)

    if isinstance(input_, torch.Tensor):
        return one(input_)
    return [one(t) for t in input_]


def reduce_scatterv(self, input_: torch.Tensor, dim: int = -1, sizes=None):
    if dim < 0:
        dim += input_.dim()
    x = input_.movedim(0, dim)  # as CudaCommunicator.reduce_scatterv
    if sizes is None:
        assert x.shape[0] % self.world_size == 0
        sizes = [x.shape[0] // self.world_size] * self.world_size
    out = torch.ops.test_vcollectives.reduce_scatterv(x.contiguous(), list(sizes), self.rank_in_group,
                                                       self.unique_name)
    return out.movedim(0, dim).contiguous()


def patch(cls) -> None:
    if getattr(cls, "_test_vcollectives", False):
        return
    cls.all_gatherv = all_gatherv
    cls.reduce_scatterv = reduce_scatterv
    cls._test_vcollectives = True
