"""Process groups: the user's group to share over, and the group of our own each sharding broadcasts over.

Everything that needs to know "which group, which rank" asks here, so passes never look ranks up
themselves: they receive a plan built from these values.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any, Optional

import torch.distributed as dist

from .errors import ShardingError

log = logging.getLogger(__name__)


def resolve_group(group: Any = None) -> dist.ProcessGroup:
    """Return the group to share over, or raise a ShardingError saying how to set one up."""
    if not dist.is_available():
        raise ShardingError("torch.distributed is not available in this build of torch; shared weights need it")
    if not dist.is_initialized():
        raise ShardingError(
            "torch.distributed is not initialised. Shared weights live on different ranks: start one "
            "process per device (e.g. torchrun) and call torch.distributed.init_process_group(...) "
            "before ascend_compile.shard_model(...)."
        )
    if isinstance(group, str):
        group = group_from_name(group)
    pg = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(pg)
    if size < 2:
        raise ShardingError(
            "the process group has world size 1: there is no other rank to share weights with. "
            "Run with 2 or more ranks, or do not call shard_model for a single-device run."
        )
    return pg


def group_from_name(group_name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group_name)
    except Exception as e:  # the c10d message does not say what to do
        raise ShardingError(
            f"process group {group_name!r} is not known in this process ({e}). The model was sharded "
            "over a group that no longer exists: shard again after init_process_group."
        ) from e


def group_name(pg: dist.ProcessGroup) -> str:
    return pg.group_name


def groups_known() -> int:
    """How many process groups this process has made (ranks that agree on it name a new group alike)."""
    from torch.distributed.distributed_c10d import _world

    return len(_world.pg_names)


def global_rank() -> int:
    return dist.get_rank()


def group_rank(pg: dist.ProcessGroup) -> int:
    return dist.get_rank(pg)


def group_size(pg: dist.ProcessGroup) -> int:
    return dist.get_world_size(pg)


def set_timeout(pg: dist.ProcessGroup, seconds: float) -> None:
    """Bound every collective of ``pg`` (ours included) by ``seconds``: a dead or diverged peer then
    raises instead of blocking. gloo honours it per operation; on HCCL see HCCL_EXEC_TIMEOUT."""
    pg.set_timeout(datetime.timedelta(seconds=seconds))


def sharing_group(pg: dist.ProcessGroup, timeout: Optional[float], same_names: bool = True,
                  blocks: Optional[tuple] = None) -> dist.ProcessGroup:
    """A new process group over the ranks of ``pg``, for the shared weights' broadcasts only.

    Every rank of ``pg`` calls it together (at shard time). Its own group means: ``timeout``
    bounds our broadcasts and nothing of the user's (vLLM's own collectives on its DP group
    keep their timeout); ``failing.abort_group`` can close it (nobody else holds it); and a
    sharding's state (windows, formats) is named by a group no other sharding uses. It costs one
    more communicator (on HCCL: its buffers, ``HCCL_BUFFSIZE``). ``same_names``: the ranks made the
    same number of groups before, so they name the new one alike (``use_local_synchronization``
    names it from the ranks and that count); otherwise the broadcasts use ``pg`` itself and a
    rank that stops inside a forward cannot close it (its peers then fail at its timeout).
    ``blocks``: the global ranks of each block of ``share_size`` (default: one block, all of ``pg``);
    every rank creates every block's group in the same order, and returns its own block's."""
    blocks = blocks or (tuple(dist.get_process_group_ranks(pg)),)
    if not same_names and len(blocks) > 1:  # the ranks gathered the same counts: every rank raises
        raise ShardingError(
            f"the ranks of process group {group_name(pg)!r} made different numbers of process groups before "
            "shard_model, so they cannot name the share_size blocks' groups alike. Create the same process groups "
            "on every rank before shard_model, or share over the whole group (share_size=None)"
        )
    if not same_names:
        log.warning(
            "ascend_compile: the ranks of process group %r made different numbers of process groups before "
            "shard_model, so they cannot name a new one alike: the shared weights are broadcast over %r itself "
            "(SharedWeightConfig(timeout) then bounds all of its collectives)", group_name(pg), group_name(pg))
        if timeout is not None:
            set_timeout(pg, timeout)
        return pg
    kwargs = {"timeout": datetime.timedelta(seconds=timeout)} if timeout is not None else {}
    me, ours = dist.get_rank(), None
    for ranks in blocks:  # a non-member returns at once: only a block's own ranks synchronise
        made = dist.new_group(list(ranks), backend=dist.get_backend(pg), use_local_synchronization=True,
                              group_desc="ascend_compile_shared_weights", **kwargs)
        if me in ranks:
            ours = made
    return ours


class _RetiredGroup:
    """Stands in c10d's table of group names for a group of ours that was destroyed (``retire``).

    c10d names a group made with ``use_local_synchronization`` from its ranks and the number of
    groups this process holds; destroying one lowers that number, so the next group over the same
    ranks would get the destroyed one's name, and its rendezvous would read the dead group's
    addresses from the store (a hang, or "Connection refused"), and our store keys (its abort
    reason) would apply to it. Keeping the name taken makes the next group's name new. c10d calls
    ``shutdown``/``abort`` on every entry when the default group is destroyed: nothing to do."""

    def __init__(self, name: str):
        self.name = name

    def shutdown(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<retired ascend_compile group {self.name}>"


def destroy(group: str) -> bool:
    """Destroy a group of ours and keep its name taken; False when it could not be destroyed."""
    from torch.distributed.distributed_c10d import _world

    try:
        dist.destroy_process_group(group_from_name(group))
    except Exception:  # noqa: BLE001 - already gone
        return False
    if group not in _world.pg_names.values():
        _world.pg_names[_RetiredGroup(group)] = group
    return True
