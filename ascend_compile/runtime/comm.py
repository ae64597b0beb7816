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


def groups_known() -> int:
    """How many process groups this process has made (ranks that agree on it name a new group alike)."""
    from torch.distributed.distributed_c10d import _world

    return len(_world.pg_names)


_SHARING_GROUPS: dict = {}  # name of a group of ours -> name of the user's group it was made over


def sharing_group(pg: dist.ProcessGroup, timeout: Optional[float], same_names: bool = True,
                  blocks: Optional[tuple] = None) -> dist.ProcessGroup:
    """A new process group over the ranks of ``pg``, for the shared weights' broadcasts only.

    Every rank of ``pg`` calls it together (at shard time). Its own group means: ``timeout``
    bounds our broadcasts and nothing of the user's (vLLM's own collectives on its DP group
    keep their timeout); ``abort_group`` can close it (nobody else holds it); and a sharding's
    state (windows, formats) is named by a group no other sharding uses. It costs one more
    communicator (on HCCL: its buffers, ``HCCL_BUFFSIZE``). ``same_names``: the ranks made the
    same number of groups before, so they name the new one alike (``use_local_synchronization``
    names it from the ranks and that count); otherwise the broadcasts use ``pg`` itself and a
    rank that stops inside a forward cannot close it (its peers then fail at its timeout).
    ``blocks``: the global ranks of each block of ``share_size`` (default: one block, all of ``pg``);
    every rank creates every block's group in the same order, and returns its own block's."""
    import datetime
    import logging

    blocks = blocks or (tuple(dist.get_process_group_ranks(pg)),)
    if not same_names and len(blocks) > 1:  # the ranks gathered the same counts: every rank raises
        raise ShardingError(
            f"the ranks of process group {group_name(pg)!r} made different numbers of process groups before "
            "shard_model, so they cannot name the share_size blocks' groups alike. Create the same process groups "
            "on every rank before shard_model, or share over the whole group (share_size=None)"
        )
    if not same_names:
        logging.getLogger(__name__).warning(
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
    _SHARING_GROUPS[group_name(ours)] = group_name(pg)
    return ours


def user_group_of(group: str) -> str:
    """The name of the user's group that our group ``group`` was made over (itself if it is the user's)."""
    return _SHARING_GROUPS.get(group, group)


def sharing_groups_over(user_group: str) -> list:
    """The names of the groups of ours made over the user's group ``user_group`` (and itself)."""
    return sorted({n for n, u in _SHARING_GROUPS.items() if u == user_group} | {user_group})


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
    raise_if_different(gathered, what)


def raise_if_different(gathered: list, what: str) -> None:
    """Raise RankMismatchError when the values the ranks gathered differ (the same verdict on every rank)."""
    ref = gathered[0]
    bad = [r for r, o in enumerate(gathered) if o != ref]
    if bad:
        r = bad[0]
        raise RankMismatchError(
            f"ranks disagree on the {what}: rank 0 and rank(s) {bad} differ; first difference "
            f"(rank 0 vs rank {r}) at {_first_difference(ref, gathered[r])}. Every rank must shard the "
            "same model with the same config and compile with the same options."
        )


class PeerError(RuntimeError):
    """A shared-weight broadcast failed: a peer rank died, or stopped issuing the same collectives."""


# -- failing together --------------------------------------------------------------------------
#
# A check that can fail on one rank only (its model, its config, its processing) must not leave
# the other ranks waiting in the next collective: outside a forward, the ranks exchange "ok, or
# this error" and every rank raises together (``gather_or_fail``); inside a forward, a rank that
# stops alone aborts the group (``abort_group``), so that its peers' broadcasts fail at once and
# their ``PeerError`` names it.

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
    name = group_name(pg)
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
            f"rank {r}{others} of process group {group_name(pg)!r} failed {what}, so every rank stops here: "
            f"{cls}: {msg}"
        )
    return [v[1] for v in gathered]


NO_PEER = "A peer rank died, or it stopped issuing the same collectives"


def peer_cause(group: str, hint: str = "") -> str:
    """Why a collective over ``group`` failed, as far as this rank can tell: the reason a peer
    published when it aborted the group, else the usual suspects (``hint`` adds to them)."""
    why = abort_reason(group)
    return f"{why[0].upper()}{why[1:]}" if why else NO_PEER + hint


def peer_error(failed: str, group: str, e: BaseException, hint: str = "") -> "PeerError":
    """``PeerError("<failed> over process group G failed: <first line of e>. <cause>; restart every rank.")``."""
    return PeerError(f"{failed} over process group {group!r} failed: {first_line(e)}. {peer_cause(group, hint)}; "
                     "restart every rank.")


def _abort_key(group: str) -> str:
    """Named by the group and its sharding's token: a store that outlives the group (a torchrun agent's,
    a re-initialised default group's) or a later group under the same name never reads it as its own."""
    return f"ascend_compile/abort/{group}/{_SHARD_STATE.get(group, {}).get('token', '')}"


_ABORT_STORES: list = []  # keeps a store alive that this rank hosts, for its peers to read the reason


def abort_group(group: str, reason: BaseException) -> None:
    """This rank stops inside a forward while its peers may be waiting in a broadcast: publish why
    (the store; peers name this rank in their ``PeerError``) and destroy the process group, so that
    its connections close and the peers' collectives fail at once instead of at the group's timeout.

    The group is unusable after a forward stopped half-way (the next collective would pair with
    another layer's), so nothing is lost. Only a group of ours (``sharing_group``) is destroyed:
    where the broadcasts had to use the user's group (the fallback), the reason is published but
    the group, which the user and torch hold, is left alone, and the peers fail at its timeout or
    when this process exits."""
    import gc
    import traceback

    try:
        pg = group_from_name(group)
        rank = dist.get_rank(pg)
    except Exception:  # noqa: BLE001 - already gone
        return
    try:
        store = _store()
        if not any(kept is store for kept in _ABORT_STORES):
            _ABORT_STORES.append(store)
        store.set(_abort_key(group), json.dumps({"rank": rank, "global_rank": dist.get_rank(),
                                                 "error": f"{type(reason).__name__}: {first_line(reason)}"}))
    except Exception:  # noqa: BLE001 - best effort: the abort itself matters more
        pass
    if group not in _SHARING_GROUPS:  # the user's group (or vLLM's): not ours to destroy
        return
    try:
        dist.destroy_process_group(pg)
    except Exception:  # noqa: BLE001
        pass
    else:
        _retire_name(group)
    del pg
    # the frames of the failure still hold the group in their locals (``pg = group_from_name(...)``)
    traceback.clear_frames(reason.__traceback__)
    gc.collect()


class _RetiredGroup:
    """Stands in c10d's table of group names for a group of ours that ``abort_group`` destroyed.

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


def _retire_name(group: str) -> None:
    from torch.distributed.distributed_c10d import _world

    if group not in _world.pg_names.values():
        _world.pg_names[_RetiredGroup(group)] = group
    _SHARING_GROUPS.pop(group, None)


def abort_reason(group: str) -> Optional[str]:
    """What a peer that aborted ``group`` published (``abort_group``), or None; never waits."""
    try:
        store = _store()
        key = _abort_key(group)
        if not store.check([key]):
            return None
        info = json.loads(store.get(key))
    except Exception:  # noqa: BLE001 - the store may be gone with the peer
        return None
    return f"rank {info['rank']} (global rank {info['global_rank']}) stopped and aborted the group: {info['error']}"


# -- what shard time agreed on, per sharing group -----------------------------------------------
#
# ``shard_model`` is the one point every rank of a group reaches together (it is called on every
# rank, in the same order, before any forward). What the graphs compiled later need to agree on
# is settled there and kept here, by group name: nothing at compile time or at a graph's first
# call talks to the other ranks through a collective.

_SHARD_STATE: dict = {}  # group name -> the latest sharding's state
_SHARDINGS: dict = {}  # (group name, generation) -> that sharding's state: each model has its own


def proposed_generation(group_name: str) -> int:
    """This rank's proposal for the next sharding generation of ``group_name`` (agreed as the max)."""
    state = _SHARD_STATE.get(group_name)
    return state["generation"] + 1 if state else 1


def new_token() -> str:
    """A proposal for a sharding's token (the ranks take rank 0's): it names the sharding's store keys."""
    import uuid

    return uuid.uuid4().hex[:12]


def record_shard(group_name: str, generation: int, costs: dict, timeout: Optional[float] = None,
                 formats: Optional[dict] = None, token: str = "") -> None:
    state = {"generation": generation, "costs": dict(costs) if costs is not None else None,
             "timeout": timeout, "formats": dict(formats or {}), "token": token}
    _SHARD_STATE[group_name] = _SHARDINGS[(group_name, generation)] = state


def shard_formats(group_name: str, generation: int = 0) -> dict:
    """``{"series[index]": aclFormat}`` of the shared weights not stored row-major ({} off NPU), of
    sharding ``generation`` (0: the latest over the group)."""
    state = _SHARDINGS.get((group_name, generation)) or _SHARD_STATE.get(group_name) or {}
    return state.get("formats", {})


def any_sharding() -> bool:
    """Whether a model was sharded in this process."""
    return bool(_SHARD_STATE)


def has_shard_state(group_name: str) -> bool:
    return group_name in _SHARD_STATE


def shard_state(group_name: str, generation: int = 0) -> dict:
    """What sharding ``generation`` over ``group_name`` agreed on (0: the latest). Several models
    may be sharded over one group; each graph's markers name the sharding of its model."""
    state = _SHARDINGS.get((group_name, generation)) or _SHARD_STATE.get(group_name)
    if state is None:
        raise ShardingError(
            f"no model was sharded over process group {group_name!r} in this process: a graph with shared "
            "weights is compiled where shard_model(...) was not called. Call ascend_compile.shard_model on every "
            "rank before compiling."
        )
    return state


# -- the collective-order check, through the process group's store ------------------------------
#
# Each rank publishes, per set of shared layers a graph fetches, the order in which its graph issues
# their broadcasts: a ``set`` on the store, which never waits for anyone. A rank compares its order
# with every peer's published one when it compiles, and at each call of the graph until every peer
# has published (a non-blocking ``check``); a difference raises RankMismatchError before the graph
# issues a collective. Nothing here can pair with a broadcast.

def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def order_key(group_name: str, generation: int, layers: list, wrap: tuple = (), token: str = "") -> str:
    """Where graphs fetching the same ``layers`` (``["series[index]", ...]``, sorted) with the same
    wrap-around setting (``CompilePlan.wrap``: a model's own, several models may share a group)
    publish their order. Which layers come from windows is not part of the key: a rank that
    takes another layer first must meet the others' order, and be told. ``token``: the sharding's
    (``record_shard``), so that keys left in a store by an earlier group of the same name never match."""
    return f"ascend_compile/order/{group_name}/{generation}{'.' + token if token else ''}/{fingerprint([layers, list(wrap)])}"


def publish_order(key: str, rank: int, order: list) -> None:
    """Compare ``order`` with what this rank and its peers already published under ``key``, then publish it."""
    store = _store()
    mine = f"{key}/{rank}"
    if store.check([mine]):
        before = json.loads(store.get(mine))
        if before != order:
            raise RankMismatchError(
                f"rank {rank} compiled two graphs over the same shared layers with different collective orders "
                f"(first difference at {_first_difference(before, order)}): compile every graph of the model with "
                "the same prefetch_step."
            )
    else:
        store.set(mine, json.dumps(order))


def check_published(key: str, rank: int, world_size: int, order: list, where: str) -> bool:
    """True when every peer published ``order`` under ``key``; False while some have not; raises on a difference."""
    store = _store()
    complete = True
    for peer in range(world_size):
        if peer == rank:
            continue
        theirs = f"{key}/{peer}"
        if not store.check([theirs]):
            complete = False
            continue
        other = json.loads(store.get(theirs))
        if other != order:
            raise RankMismatchError(
                f"ranks disagree on the collective order of {where} and would deadlock; first difference (rank "
                f"{rank} vs rank {peer}) at {_first_difference(order, other)}. Every rank must run the same model "
                "code path, sharded with the same config and compiled with the same options."
            )
    return complete


def set_timeout(pg: dist.ProcessGroup, seconds: float) -> None:
    """Bound every collective of ``pg`` (ours included) by ``seconds``: a dead or diverged peer then
    raises instead of blocking. gloo honours it per operation; on HCCL see HCCL_EXEC_TIMEOUT."""
    import datetime

    pg.set_timeout(datetime.timedelta(seconds=seconds))


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
