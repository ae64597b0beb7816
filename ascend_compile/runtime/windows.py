"""Prefetch across steps: windows that a graph fills for the next forward.

With wrap-around, the first ``w`` layers of each series are broadcast during the last layers of a
forward into persistent windows, and the next forward (whichever compiled graph over the same
layers runs next) waits for them at their use instead of fetching them at its entry. Three ops,
inserted by our passes:

- ``window_fetch`` (at graph entry): when no window of this layer is in flight (the first forward,
  or after ``invalidate``) it issues the broadcast into a new window; otherwise it does nothing;
- ``window_wait`` (right before the first use): waits for the window and hands its buffer to the
  graph (the window is consumed);
- ``window_prefetch`` (right after the wait of layer ``N - w + j``): issues the broadcast of
  window ``j`` for the next forward.

Every rank issues the same collectives in the same order as long as every rank sees the same
sequence of forwards and invalidations: then every rank has a window in flight, or none, at the
same point. ``invalidate`` (weights changed: reload, RL update) must be called on every rank of
the group; a rank that finds its windows invalidated waits on the store (not a collective) until
every peer has invalidated too, and raises naming the ranks that did not.

Every rank, the owner included, receives into a window buffer of its own (the owner copies its
parameter into it), so what the graph gets is always a fresh tensor that it may free: one
layer-sized copy per window on the owner, in exchange for never handing the graph a parameter.
"""

from __future__ import annotations

import datetime
import logging
from typing import Optional

import torch
import torch.distributed as dist

from . import formats, state
from .errors import PeerError, RankMismatchError, first_line, is_comm_failure
from .failing import abort_group, peer_error
from .groups import group_from_name
from .marker import OP_NAMESPACE, layer_name
from .order import store

log = logging.getLogger(__name__)

INVALIDATE_WAIT_S = 300.0  # how long a rank waits for its peers' invalidate() before raising


def _windows(group_name: str) -> state.Windows:
    """The windows of the sharding over ``group_name``. A window is named by its layer, ``(series,
    index)``: the group is its sharding's own (``groups.sharing_group``; a sharding that must use a
    shared group has no windows), so no other model's layer shares it. The broadcast into a slot's
    buffer is a functional collective: ``wait_tensor(buffer)`` completes it."""
    return state.get(group_name).windows


def in_flight(group_name: str) -> list:
    """``["series[index]", ...]`` of the windows currently in flight for ``group_name``."""
    return sorted(layer_name(series, index) for series, index in _windows(group_name).slots)


def _fail(e: BaseException, series: str, index: int, owner: int, group_name: str, what: str):
    if isinstance(e, PeerError) or not is_comm_failure(e):
        raise e
    err = peer_error(f"the {what} of {layer_name(series, index)} from rank {owner}", group_name, e,
                     " (every rank must run the same sequence of forwards and call invalidate_prefetch at the same point)")
    err.layer = layer_name(series, index)  # a compiled graph names itself around it (backend.GuardedGraph)
    raise err from e


def _issue(w: torch.Tensor, series: str, index: int, owner: int, group_name: str) -> tuple:
    """Broadcast ``series[index]`` into a new window: ``(buffer, owner)`` for the slot. After an
    invalidation, the first one waits until every peer invalidated too."""
    windows = _windows(group_name)
    if windows.epoch != windows.confirmed:
        _confirm_peers(group_name, windows)
    pg = group_from_name(group_name)
    fmt = state.get(group_name).formats.get(layer_name(series, index))
    buf = formats.empty_in_format(w.shape, w.dtype, w.device, fmt)
    if dist.get_rank(pg) == owner:
        buf.copy_(w)
    try:  # the functional collective, as in the graph: the same path on gloo and HCCL
        torch.ops._c10d_functional.broadcast_(buf, owner, group_name)
    except Exception as e:
        _fail(e, series, index, owner, group_name, "broadcast")
    return buf, owner


def _drain(slots: dict, group_name: str) -> None:
    """Complete every window in flight (each rank issued them: waiting pairs with nothing new)."""
    for (series, index), (buf, owner) in sorted(slots.items()):
        try:
            torch.ops._c10d_functional.wait_tensor(buf)
        except Exception as e:
            _fail(e, series, index, owner, group_name, "prefetched broadcast")
    slots.clear()


def _store_key(group_name: str, epoch: int, rank: int) -> str:
    return f"ascend_compile/windows/{group_name}/{epoch}/{rank}"


def _confirm_peers(group_name: str, windows: state.Windows) -> None:
    """After an invalidation, before issuing a collective: every peer must have invalidated too."""
    pg = group_from_name(group_name)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    keys = [_store_key(group_name, windows.epoch, peer) for peer in range(world) if peer != rank]
    kv = store()
    try:
        kv.wait(keys, datetime.timedelta(seconds=INVALIDATE_WAIT_S))
    except Exception as e:
        missing = [peer for peer in range(world) if peer != rank and not kv.check([_store_key(group_name, windows.epoch, peer)])]
        err = RankMismatchError(
            f"rank {rank} invalidated its prefetched windows over process group {group_name!r} "
            f"(invalidate_prefetch call {windows.epoch}) but rank(s) {missing} did not within {INVALIDATE_WAIT_S:.0f} s "
            f"({first_line(e)}). Call ascend_compile.invalidate_prefetch on every rank of the group, at the same "
            "point (after the weights change, before the next forward)."
        )
        abort_group(group_name, err)  # the peers that did not invalidate would pair with the wrong windows
        raise err from e
    windows.confirmed = windows.epoch


def invalidate(group_name: str) -> list:
    """Drop the windows of ``group_name`` (waiting for any in flight): the next forward fetches its
    first layers again. Call on every rank of the group, after the weights changed. Returns the
    layers that were in flight."""
    windows = _windows(group_name)
    dropped = in_flight(group_name)
    _drain(windows.slots, group_name)
    windows.epoch += 1
    if dist.is_initialized():
        pg = group_from_name(group_name)
        store().set(_store_key(group_name, windows.epoch, dist.get_rank(pg)), "1")
    log.info("ascend_compile: invalidated prefetched windows %s of group %s", dropped, group_name)
    return dropped


def complete(group_name: str) -> list:
    """Wait for the windows of ``group_name`` in flight, keeping them for the next forward (which
    waits on them again at no cost). Issues nothing: any rank may call it at any point. Returns
    the layers waited for."""
    slots = _windows(group_name).slots
    for (series, index), (buf, owner) in sorted(slots.items()):
        try:
            torch.ops._c10d_functional.wait_tensor(buf)
        except Exception as e:
            _fail(e, series, index, owner, group_name, "prefetched broadcast")
    return in_flight(group_name)


# -- eager forwards ------------------------------------------------------------------------------
#
# A rank may run a forward eagerly while its peers run compiled graphs (Dynamo's recompile limit,
# suppress_errors, a warm-up, a user's uncompiled call). Its collectives must be the compiled
# graph's: the first w layers of a series come from the windows in flight (fetched at their read
# when none is), every other layer is broadcast at its read (the compiled order of fetching at
# use), and once every layer of the sharding was read, the next forward's windows are sent in the
# compiled graph's order (by the read of their anchor layer N - w + j, then series, then index).
# The fetches of windows not in flight go at their read, where the compiled graph puts them all at
# its entry: the same order for models whose series' first w layers are read before any other
# shared layer (every series spanning the same decoder layers, as DeepSeek's o_proj and q_b_proj).

def eager_read(w: torch.Tensor, series: str, index: int, owner: int, group_name: str, wrap: int,
               read_sync) -> torch.Tensor:
    """The value of ``series[index]`` in an eager forward under wrap-around (``wrap`` windows of its
    series); ``read_sync()`` is the marker's own synchronous broadcast for a layer no window holds."""
    windows = _windows(group_name)
    reads = windows.reads
    if any(r[:2] == (series, index) for r in reads):  # read again: a new forward (one left half-way)
        reads.clear()
    reads.append((series, index, owner, w))
    if index < wrap:
        slot = windows.slots.pop((series, index), None)
        if slot is None:
            slot = _issue(w, series, index, owner, group_name)
        buf = slot[0]
        try:
            torch.ops._c10d_functional.wait_tensor(buf)
        except Exception as e:
            _fail(e, series, index, owner, group_name, "broadcast")
        out = buf
    else:
        out = read_sync()
    done = {r[:2] for r in reads}
    if all((name, i) in done for name, (n, _) in windows.series.items() for i in range(n)):
        _send_next_windows(windows, group_name)
    return out


def _send_next_windows(windows: state.Windows, group_name: str) -> None:
    """End of an eager forward: the next forward's windows, in the compiled graph's order."""
    reads, windows.reads = windows.reads, []
    pos = {r[:2]: i for i, r in enumerate(reads)}
    todo = []
    for name, (n, w) in windows.series.items():
        if w <= 0:
            continue
        order = sorted((r for r in reads if r[0] == name), key=lambda r: pos[r[:2]])
        for j in range(w):
            todo.append((pos[order[n - w + j][:2]], name, order[j][1], order[j]))
    for _, name, index, (_, _, owner, weight) in sorted(todo, key=lambda t: t[:3]):
        old = windows.slots.pop((name, index), None)
        if old is not None:
            _drain({(name, index): old}, group_name)
        windows.slots[(name, index)] = _issue(weight, name, index, owner, group_name)


@torch.library.custom_op(f"{OP_NAMESPACE}::window_fetch", mutates_args=())
def window_fetch(w: torch.Tensor, series: str, index: int, owner: int, group_name: str) -> torch.Tensor:
    """At graph entry: issue the broadcast of ``series[index]`` unless a window of it is in flight.
    ``w`` is the owner's parameter (or another rank's stand-in: shape and dtype only). Returns a
    one-element token that orders ``window_wait`` after it."""
    slots = _windows(group_name).slots
    if (series, index) not in slots:
        slots[(series, index)] = _issue(w, series, index, owner, group_name)
    return w.new_empty(1)


@window_fetch.register_fake
def _(w, series, index, owner, group_name):
    return w.new_empty(1)


@torch.library.custom_op(f"{OP_NAMESPACE}::window_wait", mutates_args=())
def window_wait(token: torch.Tensor, w: torch.Tensor, series: str, index: int, owner: int,
                group_name: str) -> torch.Tensor:
    """Right before the first use: wait for the window of ``series[index]`` and return its buffer."""
    slot = _windows(group_name).slots.pop((series, index), None)
    if slot is None:
        raise RuntimeError(
            f"no prefetched window of {layer_name(series, index)} over process group {group_name!r}: "
            "window_wait ran without its window_fetch (a graph was not scheduled by ascend_compile)"
        )
    buf, _ = slot
    try:
        torch.ops._c10d_functional.wait_tensor(buf)
    except Exception as e:
        _fail(e, series, index, owner, group_name, "broadcast")
    return buf


@window_wait.register_fake
def _(token, w, series, index, owner, group_name):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


@torch.library.custom_op(f"{OP_NAMESPACE}::window_prefetch", mutates_args=())
def window_prefetch(w: torch.Tensor, after: torch.Tensor, last: torch.Tensor, prev: Optional[torch.Tensor],
                    series: str, index: int, owner: int, group_name: str) -> torch.Tensor:
    """Near the end of a forward: issue the broadcast of ``series[index]`` for the next forward.
    ``after`` (the weight whose wait it follows), ``last`` (the output of the graph's last
    broadcast, never read) and ``prev`` (the token of the window issued before) only order it: they
    are what keeps it after every other collective of the graph (see ``passes/prefetch.py``).
    Returns a one-element token."""
    slots = _windows(group_name).slots
    key = (series, index)
    old = slots.pop(key, None)
    if old is not None:  # never consumed (every graph that sends it takes it at entry): complete it first
        _drain({key: old}, group_name)
    slots[key] = _issue(w, series, index, owner, group_name)
    return w.new_empty(1)


@window_prefetch.register_fake
def _(w, after, last, prev, series, index, owner, group_name):
    return w.new_empty(1)


# The tokens of window_fetch / window_prefetch may have no reader: they must not be removed.
torch.fx.node.has_side_effect(torch.ops.ascend_compile.window_fetch.default)
torch.fx.node.has_side_effect(torch.ops.ascend_compile.window_prefetch.default)


def window_targets() -> dict:
    ns = getattr(torch.ops, OP_NAMESPACE)
    return {"fetch": ns.window_fetch.default, "wait": ns.window_wait.default, "next": ns.window_prefetch.default}
