"""Process-group helpers and the cross-rank agreement check.

Everything that needs to know "which group, which rank" lives here, so passes never look
ranks up themselves: they receive a plan built from these values.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import torch.distributed as dist


class ShardingError(RuntimeError):
    """Sharding cannot proceed; the message says why and what to do."""


class RankMismatchError(RuntimeError):
    """Ranks disagree on something that must be identical on every rank."""


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


def global_rank() -> int:
    return dist.get_rank()


def group_rank(pg: dist.ProcessGroup) -> int:
    return dist.get_rank(pg)


def group_size(pg: dist.ProcessGroup) -> int:
    return dist.get_world_size(pg)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if type(a) is not type(b):
        return f"{path or 'value'}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key}: {'missing' if key not in a else a[key]!r} vs {'missing' if key not in b else b[key]!r}"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{path}.{key}" if path else str(key))
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
        if len(a) != len(b):
            return f"{path}: {len(a)} entries vs {len(b)} entries"
    return f"{path or 'value'}: {a!r} vs {b!r}"


def check_same_across_ranks(obj: Any, pg: Optional[dist.ProcessGroup], what: str) -> None:
    """Raise RankMismatchError on *every* rank when ``obj`` differs between ranks of ``pg``.

    Collective order must be identical on every rank or they deadlock; this turns a would-be
    hang into an error that names the ranks and the first difference. It is itself a
    collective: every rank of the group must call it, in the same order.
    """
    pg = pg if pg is not None else dist.group.WORLD
    gathered: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(gathered, obj, group=pg)
    ref = gathered[0]
    bad = [r for r, o in enumerate(gathered) if o != ref]
    if bad:
        r = bad[0]
        raise RankMismatchError(
            f"ranks disagree on the {what}: rank 0 and rank(s) {bad} differ; first difference "
            f"(rank 0 vs rank {r}) at {_first_difference(ref, gathered[r])}. Every rank must shard the "
            "same model with the same config and compile with the same options."
        )
