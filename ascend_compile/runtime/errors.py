"""The errors ranks raise, and how to tell a failed collective and describe a difference."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch.distributed as dist


class ShardingError(RuntimeError):
    """Sharding cannot proceed; the message says why and what to do."""


class RankMismatchError(RuntimeError):
    """Ranks disagree on something that must be identical on every rank."""


class PeerError(RuntimeError):
    """A shared-weight broadcast failed: a peer rank died, or stopped issuing the same collectives."""


NO_PEER = "A peer rank died, or it stopped issuing the same collectives"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (c10d errors carry long backtraces), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_comm_failure(e: BaseException) -> bool:
    """An exception that a failed or timed-out collective raises (gloo, HCCL, NCCL, c10d)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "HCCL", "hccl", "NCCL", "Connection closed", "Connection reset",
                            "Timed out", "timed out", "Broken pipe")
    )


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two JSON-able values first differ, as ``"path: a vs b"``."""
    if type(a) is not type(b):
        return f"{path or 'value'}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key}: {'missing' if key not in a else a[key]!r} vs {'missing' if key not in b else b[key]!r}"
            if a[key] != b[key]:
                return first_difference(a[key], b[key], f"{path}.{key}" if path else str(key))
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
        if len(a) != len(b):
            return f"{path}: {len(a)} entries vs {len(b)} entries"
    return f"{path or 'value'}: {a!r} vs {b!r}"


def raise_if_different(gathered: list, what: str) -> None:
    """Raise RankMismatchError when the values the ranks gathered differ (the same verdict on every rank)."""
    ref = gathered[0]
    bad = [r for r, o in enumerate(gathered) if o != ref]
    if bad:
        r = bad[0]
        raise RankMismatchError(
            f"ranks disagree on the {what}: rank 0 and rank(s) {bad} differ; first difference "
            f"(rank 0 vs rank {r}) at {first_difference(ref, gathered[r])}. Every rank must shard the "
            "same model with the same config and compile with the same options."
        )
