"""The guard around a compiled graph with shared weights, at run time: the cross-rank order check
through the store, the layer a failed broadcast belongs to, and the abort of the sharing group
when this rank stops half-way through a forward."""

from __future__ import annotations

from typing import Optional

from . import errors, failing, groups, opaque, state
from .order import check_published, order_key, publish_order


class GuardedGraph:
    """A compiled graph with shared weights, checked against the other ranks without a collective.

    - Its collective order is compared with every peer's order for the same layers through the
      store (``OrderCheck``): a difference raises ``RankMismatchError`` before this graph issues a
      broadcast.
    - Its broadcasts wait for peers that are still compiling (ranks compile at different calls):
      ``SharedWeightConfig(timeout)`` must exceed the longest compile; ``_compile_shared`` warns
      when a compile took more than half of it. (Waiting on the store for a peer's compile
      instead cannot tell a slow peer from one that runs the forward eagerly, or died.)
    - A broadcast that fails (a peer died, or timed out because it stopped issuing the same
      collectives) raises ``PeerError`` naming the graph, the group and the layer; any error
      aborts the group (``failing.abort_group``) so that the peers fail at once, naming this rank.
    """

    def __init__(self, compiled, *, order: list, key: str, plan, graph_id: str,
                 waits: dict, waits_in_order: list, timeout=None, check: bool = True):
        self.compiled = compiled
        self.order, self.plan = order, plan
        self.graph_id = graph_id
        self.waits = waits  # names of the nodes that wait for / issue a layer -> "series[index]"
        self.waits_in_order = waits_in_order  # "series[index]" of each wait, in graph order
        self.timeout = timeout
        self.check = OrderCheck(
            key, plan.rank, plan.world_size, [str(c) for c in order],
            f"compiled graph {graph_id} (shared layers {order[0].layer}..{order[-1].layer})", check)
        # the layers it fetches itself; a read of any other shared layer while it runs is an opaque op's
        self.visible = frozenset(opaque.weight_key(plan.group_name, plan.generation, c.layer) for c in order)

    @property
    def verified(self) -> bool:
        return self.check.verified

    def __call__(self, *args):
        try:
            self.check.before_call()
            try:
                with opaque.running_graph(self.graph_id, self.visible):
                    return self.compiled(*args)
            except Exception as e:
                layer = getattr(e, "layer", None)  # a window op's PeerError names its layer
                if layer is not None and isinstance(e, errors.PeerError):
                    raise errors.PeerError(self.describe_failure(e.__cause__ or e, layer)) from e
                if isinstance(e, errors.PeerError) or not errors.is_comm_failure(e):
                    raise
                raise errors.PeerError(self.describe_failure(e)) from e
        except BaseException as e:
            # This rank leaves its forward half-way (or never starts it): its peers are, or will be,
            # waiting in a broadcast it does not join. Abort the group so they fail at once, naming it.
            failing.abort_group(self.plan.group_name, e)
            raise

    def describe_failure(self, e: BaseException, layer: Optional[str] = None) -> str:
        layer = layer or failed_layer(e, self.waits, self.waits_in_order)
        where = f"the broadcast of {layer}" if layer else f"one of its {len(self.order)} broadcasts"
        bound = (f"SharedWeightConfig(timeout={self.timeout})" if self.timeout is not None
                 else "the process group's own timeout (set SharedWeightConfig(timeout=...) to bound it)")
        cause = failing.peer_cause(self.plan.group_name, " (it skipped a forward, ran another model path, or was "
                                                      "still compiling at the timeout)")
        return (
            f"compiled graph {self.graph_id} failed in {where} over process group {self.plan.group_name!r} "
            f"(rank {self.plan.rank} of {self.plan.world_size}): {errors.first_line(e)}. {cause}; the wait was bounded by "
            f"{bound}. Restart every rank: the group is unusable now."
        )


def failed_layer(e: BaseException, names: dict, waits_in_order: list) -> Optional[str]:
    """The layer whose collective raised, read from the innermost traceback frame in generated code:
    FX code names our nodes; Inductor's wrapper does not, but it keeps the waits in our order, so
    the n-th ``wait_tensor`` call of its ``call`` is our n-th wait (when the counts agree)."""
    import linecache
    import re

    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    for filename, lineno in reversed(frames):
        line = linecache.getline(filename, lineno)
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", line):
            if word in names:
                return names[word]
        if "_c10d_functional.wait_tensor" in line:
            lines = linecache.getlines(filename)
            calls = [i for i, text in enumerate(lines, start=1) if "_c10d_functional.wait_tensor" in text]
            if len(calls) == len(waits_in_order) and lineno in calls:
                return waits_in_order[calls.index(lineno)]
            return None
    return None


class OrderCheck:
    """A compiled graph's collective order, checked against the other ranks' without a collective:
    published to the process group's store at compile time (a difference from an order already
    there is kept and raised at the first call: Dynamo would wrap it into BackendCompilerFailed
    here), then compared with every peer's at calls 1, 2, 4, 8, ... until every peer has published
    (a non-blocking store lookup: a peer that never publishes, e.g. with another layer set, costs
    little). ``before_call`` raises ``RankMismatchError`` before the graph issues a collective."""

    def __init__(self, key: str, rank: int, world_size: int, order: list, what: str, check: bool = True):
        self.key, self.rank, self.world_size, self.order, self.what = key, rank, world_size, order, what
        self.verified = not check
        self.calls = 0
        self.error = None
        if check:
            try:
                publish_order(key, rank, order)
            except errors.RankMismatchError as e:
                self.error = e

    def before_call(self) -> None:
        if self.verified:
            return
        self.calls += 1
        if self.calls & (self.calls - 1) == 0:  # calls 1, 2, 4, 8, ...
            if self.error is not None:
                raise self.error
            self.verified = check_published(self.key, self.rank, self.world_size, self.order, self.what)


class SlicedOrderGuard:
    """A compiled graph of sliced layers (``layout="slices"``), checked against the other ranks'
    graphs of the same layers as ``GuardedGraph`` checks broadcasts (``OrderCheck``): the order in
    which it calls its sliced layers is the order of their collectives (fixed by the ordered
    effect). Without it, ranks calling same-shaped layers in different orders would pair one
    layer's collectives with another's and compute wrong values without an error."""

    def __init__(self, compiled, *, layers: list, graph_id: str, check: bool = True):
        shardings = sorted({(g, gen) for _, _, g, gen in layers})
        self.compiled = compiled
        self.group_name, generation = shardings[0]  # one model's layers: one sharding
        pg = groups.group_from_name(self.group_name)
        calls = [f"{series}[{index}] (sliced)" for series, index, _, _ in layers]
        sharding = state.get(self.group_name, generation)
        self.graph_id = graph_id
        self.visible = frozenset(opaque.sliced_key(*layer) for layer in layers)
        self.state = sharding.slices
        self.check = OrderCheck(
            order_key(self.group_name, generation, sorted(calls), ("slices",), sharding.token),
            groups.group_rank(pg), groups.group_size(pg), calls,
            f"compiled graph {graph_id} (sliced layers {calls[0]}..{calls[-1]})", check)

    def __call__(self, *args):
        try:
            self.check.before_call()
            self.state.start_forward()  # a forward (or the next piece of one) starts here
            with opaque.running_graph(self.graph_id, self.visible):
                return self.compiled(*args)
        except errors.RankMismatchError as e:
            failing.abort_group(self.group_name, e)  # peers already in a sliced layer's collectives fail at once
            raise


class OpaqueReadGuard:
    """A compiled graph without shared layers of its own, in a process that holds a sharded model:
    while it runs, a shared layer read inside an op it cannot see (outside ``fetch_layers``) raises
    ``OpaqueReadError`` instead of issuing a collective its peers may never join."""

    def __init__(self, compiled, graph_id: str):
        self.compiled, self.graph_id = compiled, graph_id

    def __call__(self, *args):
        with opaque.running_graph(self.graph_id, frozenset()):
            return self.compiled(*args)
