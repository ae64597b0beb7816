"""The collective-order check, through the process group's store: never a collective.

Each rank publishes, per set of shared layers a graph fetches, the order in which its graph issues
their broadcasts: a ``set`` on the store, which never waits for anyone. A rank compares its order
with every peer's published one when it compiles, and at each call of the graph until every peer
has published (a non-blocking ``check``); a difference raises RankMismatchError before the graph
issues a collective. Nothing here can pair with a broadcast.
"""

from __future__ import annotations

import json

from .errors import RankMismatchError, fingerprint, first_difference


def store():
    """The default group's store (hosted by global rank 0): order checks, abort reasons, invalidations."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def order_key(group_name: str, generation: int, layers: list, wrap: tuple = (), token: str = "") -> str:
    """Where graphs fetching the same ``layers`` (``["series[index]", ...]``, sorted) with the same
    wrap-around setting (``CompilePlan.wrap``: a model's own, several models may share a group)
    publish their order. Which layers come from windows is not part of the key: a rank that
    takes another layer first must meet the others' order, and be told. ``token``: the sharding's
    (``Sharding.token``), so that keys left in a store by an earlier group of the same name never match."""
    return f"ascend_compile/order/{group_name}/{generation}{'.' + token if token else ''}/{fingerprint([layers, list(wrap)])}"


def publish_order(key: str, rank: int, order: list) -> None:
    """Compare ``order`` with what this rank and its peers already published under ``key``, then publish it."""
    kv = store()
    mine = f"{key}/{rank}"
    if kv.check([mine]):
        before = json.loads(kv.get(mine))
        if before != order:
            raise RankMismatchError(
                f"rank {rank} compiled two graphs over the same shared layers with different collective orders "
                f"(first difference at {first_difference(before, order)}): compile every graph of the model with "
                "the same prefetch_step."
            )
    else:
        kv.set(mine, json.dumps(order))


def check_published(key: str, rank: int, world_size: int, order: list, where: str) -> bool:
    """True when every peer published ``order`` under ``key``; False while some have not; raises on a difference."""
    kv = store()
    complete = True
    for peer in range(world_size):
        if peer == rank:
            continue
        theirs = f"{key}/{peer}"
        if not kv.check([theirs]):
            complete = False
            continue
        other = json.loads(kv.get(theirs))
        if other != order:
            raise RankMismatchError(
                f"ranks disagree on the collective order of {where} and would deadlock; first difference (rank "
                f"{rank} vs rank {peer}) at {first_difference(order, other)}. Every rank must run the same model "
                "code path, sharded with the same config and compiled with the same options."
            )
    return complete
