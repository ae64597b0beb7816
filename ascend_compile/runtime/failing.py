"""Failing together: a rank that fails alone makes every rank of its group raise, never wait.

A check that can fail on one rank only (its model, its config, its processing) must not leave the
other ranks waiting in the next collective: outside a forward, the ranks exchange "ok, or this
error" and every rank raises together (``gather_or_fail``); inside a forward, a rank that stops
alone aborts the group (``abort_group``), so that its peers' broadcasts fail at once and their
``PeerError`` names it.
"""

from __future__ import annotations

import gc
import json
import traceback
from typing import Optional

import torch.distributed as dist

from . import groups, order, state
from .errors import NO_PEER, PeerError, RankMismatchError, ShardingError, first_line, is_comm_failure


def _error_class(name: str) -> type:
    from ..config import ConfigError

    return {"ConfigError": ConfigError, "RankMismatchError": RankMismatchError}.get(name, ShardingError)


def gather_or_fail(pg: dist.ProcessGroup, what: str, compute) -> list:
    """Run ``compute()`` on this rank, then gather every rank's value (one ``all_gather_object``).

    If ``compute`` raised on any rank, every rank raises: the rank that failed its own error, the
    others an error of the same ascend_compile class (``ConfigError``, ``RankMismatchError``, else
    ``ShardingError``) naming the rank and its message. Every rank of ``pg`` must call it at the
    same point; ``compute`` must not itself run a collective."""
    error, value = None, None
    try:
        value = compute()
    except Exception as e:  # noqa: BLE001 - any failure is reported to the peers, then re-raised
        error = e
    mine = ("ok", value) if error is None else ("error", type(error).__name__, str(error))
    gathered: list = [None] * dist.get_world_size(pg)
    name = groups.group_name(pg)
    try:
        dist.all_gather_object(gathered, mine, group=pg)
    except Exception as e:
        if error is not None:
            raise error from e
        if not is_comm_failure(e):
            raise
        raise peer_error(f"the exchange of every rank's result {what}", name, e) from e
    if error is not None:
        raise error
    failed = [(r, v) for r, v in enumerate(gathered) if v[0] == "error"]
    if failed:
        r, (_, cls, msg) = failed[0]
        others = f" (and rank(s) {[q for q, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise _error_class(cls)(
            f"rank {r}{others} of process group {name!r} failed {what}, so every rank stops here: {cls}: {msg}"
        )
    return [v[1] for v in gathered]


def peer_cause(group: str, hint: str = "") -> str:
    """Why a collective over ``group`` failed, as far as this rank can tell: the reason a peer
    published when it aborted the group, else the usual suspects (``hint`` adds to them)."""
    why = abort_reason(group)
    return f"{why[0].upper()}{why[1:]}" if why else NO_PEER + hint


def peer_error(failed: str, group: str, e: BaseException, hint: str = "") -> PeerError:
    """``PeerError("<failed> over process group G failed: <first line of e>. <cause>; restart every rank.")``."""
    return PeerError(f"{failed} over process group {group!r} failed: {first_line(e)}. {peer_cause(group, hint)}; "
                     "restart every rank.")


def _abort_key(group: str) -> str:
    """Named by the group and its sharding's token: a store that outlives the group (a torchrun agent's,
    a re-initialised default group's) or a later group under the same name never reads it as its own."""
    found = state.find(group)
    return f"ascend_compile/abort/{group}/{found.token if found is not None else ''}"


def abort_group(group: str, reason: BaseException) -> None:
    """This rank stops inside a forward while its peers may be waiting in a broadcast: publish why
    (the store; peers name this rank in their ``PeerError``) and destroy the process group, so that
    its connections close and the peers' collectives fail at once instead of at the group's timeout.

    The group is unusable after a forward stopped half-way (the next collective would pair with
    another layer's), so nothing is lost. Only a group of ours (``groups.sharing_group``) is
    destroyed: where the broadcasts had to use the user's group (the fallback), the reason is
    published but the group, which the user and torch hold, is left alone, and the peers fail at
    its timeout or when this process exits."""
    try:
        rank = dist.get_rank(groups.group_from_name(group))
    except Exception:  # noqa: BLE001 - already gone
        return
    sharding = state.find(group)
    try:
        kv = order.store()
        if sharding is not None:
            sharding.kept_store = kv  # a store this rank hosts must outlive the group, for its peers to read
        kv.set(_abort_key(group), json.dumps({"rank": rank, "global_rank": dist.get_rank(),
                                              "error": f"{type(reason).__name__}: {first_line(reason)}"}))
    except Exception:  # noqa: BLE001 - best effort: the abort itself matters more
        pass
    if sharding is None or not sharding.ours:  # the user's group (or vLLM's): not ours to destroy
        return
    if groups.destroy(group):
        sharding.retired = True
    # the frames of the failure still hold the group in their locals (``pg = group_from_name(...)``)
    traceback.clear_frames(reason.__traceback__)
    gc.collect()


def abort_reason(group: str) -> Optional[str]:
    """What a peer that aborted ``group`` published (``abort_group``), or None; never waits."""
    try:
        kv = order.store()
        key = _abort_key(group)
        if not kv.check([key]):
            return None
        info = json.loads(kv.get(key))
    except Exception:  # noqa: BLE001 - the store may be gone with the peer
        return None
    return f"rank {info['rank']} (global rank {info['global_rank']}) stopped and aborted the group: {info['error']}"
