"""Shared layers read inside an op a compiled graph cannot see: fetched once where the op starts.

vLLM-Ascend's ``mla_forward`` (and any custom op) calls a model's ``q_b_proj`` once per part of its
batch and reads ``o_proj.weight`` for a hint before calling it: a different number of reads on
each rank. Collectives issued per read would not pair. ``fetch_layers(*layers)`` is the unit that
does: entered by every rank at the same point of every forward (the op's start, before its batch
is split), it fetches each listed layer's whole weight once (``layout="layers"``: the owner's
broadcast, through the marker op; ``"slices"``: a gather of the slices), and every read of those
layers inside the block uses it, with no collective, however many times a rank reads them. The
reference plugin is driven from the same place (``reach_layer_for_shard_weight_series``).

A read of a shared layer outside such a block while one of our compiled graphs runs, of a layer
that graph does not itself fetch, is a read the graph cannot see: it raises ``OpaqueReadError``
naming the layer and the code that read it (and closes the sharing group, so a peer that did not
read fails at once instead of waiting), never a hang. Eager forwards (no compiled graph) and other
backends cannot tell such reads from ordinary ones: there ``fetch_layers`` is what makes them right.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError
from . import formats, state
from .errors import ShardingError, is_comm_failure
from .failing import abort_group, peer_error
from .groups import group_from_name

_local = threading.local()  # .scopes: [{key: whole weight}]; .graphs: [(graph id, visible keys)]; .fetching


class OpaqueReadError(ShardingError):
    """A shared layer was read inside an op the running compiled graph cannot see, outside ``fetch_layers``."""


def _scopes() -> list:
    if not hasattr(_local, "scopes"):
        _local.scopes = []
    return _local.scopes


def _graphs() -> list:
    if not hasattr(_local, "graphs"):
        _local.graphs = []
    return _local.graphs


def weight_key(group_name: str, generation: int, layer: str) -> tuple:
    """How a fetched weight is named: its sharding (group + generation) and ``"series[index]"``."""
    return (group_name, generation, layer)


def lookup(key: tuple) -> Optional[torch.Tensor]:
    """The weight fetched for ``key`` by an enclosing ``fetch_layers`` (innermost first), or None."""
    for scope in reversed(_scopes()):
        if key in scope:
            return scope[key]
    return None


def sliced_key(series: str, index: int, group_name: str, generation: int) -> tuple:
    """``weight_key`` of a sliced layer's weight (``series`` is the layer series, e.g. ``"o_proj"``)."""
    return weight_key(group_name, generation, f"{series}.weight[{index}]")


def _shared_params(module) -> list:
    """``[(key, sliced layer's position or None, SharedWeight parametrization or None, its chain)]``:
    what of ``module`` is shared, in either layout (``[]`` for anything else)."""
    if not isinstance(module, nn.Module):
        return []
    sliced = getattr(module, "_ascend_compile_slice", None)
    if sliced is not None:
        series, index, group_name, generation, _ = sliced
        pos = _slice_state(module).position[(series, index)]
        return [(sliced_key(series, index, group_name, generation), pos, None, None)]
    from .sharding import SharedWeight

    return [(weight_key(p.group_name, p.generation, f"{p.series}[{p.index}]"), None, p, (pname, chain))
            for pname, chain in getattr(module, "parametrizations", {}).items() for p in chain
            if isinstance(p, SharedWeight)]


def is_shared_layer(module) -> bool:
    """Whether ``module`` holds a shared parameter (either layout)."""
    return bool(_shared_params(module))


def _slice_state(module):
    """The slices' forward state of a sliced module's model (its ``Sharding``)."""
    return getattr(module, state.ATTR).slices


def _shared_reads(module: nn.Module) -> list:
    """``[(key, read)]`` of a shared layer: ``read()`` fetches that parameter's whole value once."""
    reads = []
    for key, pos, _, param in _shared_params(module):
        if pos is None:
            reads.append((key, lambda pname=param[0]: getattr(module, pname)))
            continue
        sliced = _slice_state(module)
        if not sliced.can_gather(pos):
            raise ConfigError(
                f"{sliced.layers[pos].module} is read inside an op the compiled graph cannot see, where a layer computing "
                "on its slices with its own kernel (a quantized layout that is never gathered) would issue its "
                "collectives once per call, a different number of times on each rank: use "
                "SharedWeightConfig(layout='layers') for its series"
            )
        sliced.mark_opaque(pos)
        reads.append((key, lambda sliced=sliced, pos=pos: sliced.whole(pos)))
    return reads


class _Pending:
    """A fetch issued ahead (an async broadcast or gather): ``wait()`` gives the whole weight."""

    def __init__(self, work, buf: torch.Tensor, finish, what: str, group_name: str):
        self.work, self.buf, self.finish, self.what, self.group_name = work, buf, finish, what, group_name

    def wait(self) -> torch.Tensor:
        try:
            self.work.wait()
        except Exception as e:
            if not is_comm_failure(e):
                raise
            raise peer_error(self.what, self.group_name, e) from e
        return self.finish(self.buf)


def _issue_reads(module: nn.Module) -> dict:
    """``{key: _Pending}``: every shared parameter of ``module`` fetched asynchronously (the owner's
    broadcast, or a gather of the slices), to be waited for at its use."""
    import torch.distributed as dist

    out = {}
    for key, pos, p, param in _shared_params(module):
        if pos is not None:
            sliced = _slice_state(module)
            work, buf = sliced.issue_gather(pos, None)
            out[key] = _Pending(work, buf, lambda b, sliced=sliced, pos=pos: sliced.whole_of(pos, b),
                                f"the gather of {sliced.layers[pos].module}'s slices", sliced.group_name)
            continue
        w = param[1].original
        pg = group_from_name(p.group_name)
        name = f"{p.series}[{p.index}]"
        buf = formats.empty_in_format(w.shape, w.dtype, w.device, p.sharding.formats.get(name))
        if dist.get_rank(pg) == p.owner:
            buf.copy_(w)
        work = dist.broadcast(buf, group_src=p.owner, group=pg, async_op=True)
        out[key] = _Pending(work, buf, lambda b: b, f"the broadcast of {name} from rank {p.owner}", p.group_name)
    return out


class OpaqueReaders:
    """The ops of one sharded model that read shared layers inside (vLLM-Ascend's attention impls),
    in the order every forward calls them, with the layers each reads. ``enter(pos)`` is
    ``fetch_layers`` for op ``pos`` that also fetches the layers of the next ``prefetch_step`` ops
    asynchronously, so their transfer overlaps this op's compute: the reference plugin's
    ``reach_layer`` prefetch, one op per step. Every rank calls every op in the same order in every
    forward (vLLM runs every layer's attention in every forward, dummy ones included), so every
    rank issues the same collectives; an op entered out of that order raises, naming both ops."""

    def __init__(self, readers: list, prefetch_step: int):
        self.readers = readers  # [(op name, [layers])], in call order
        self.prefetch_step = max(0, prefetch_step)
        self.in_flight: dict = {}  # op position -> {key: _Pending}
        self.last: Optional[int] = None  # the op entered last in this forward

    def schedule(self) -> list:
        """What dumps show: each op, the layers it reads, and where they are fetched."""
        rows = []
        for pos, (name, layers) in enumerate(self.readers):
            ahead = pos - self.prefetch_step
            rows.append({"op": name, "reads": [key[2] for m in layers for key, *_ in _shared_params(m)],
                         "fetched": "at its start" if ahead < 0 or not self.prefetch_step
                         else f"at the start of {self.readers[ahead][0]}, {self.prefetch_step} op(s) ahead"})
        return rows

    @contextlib.contextmanager
    def enter(self, pos: int):
        name, layers = self.readers[pos]
        if pos == 0:
            self._drain()  # left by a forward that stopped early on this rank: complete, drop
        elif self.prefetch_step and self.last != pos - 1:
            last = "none" if self.last is None else self.readers[self.last][0]
            raise ShardingError(
                f"{name} started after {last}, but the layers of ops are prefetched in the order every forward calls "
                f"them ({self.readers[0][0]}, ..., {self.readers[-1][0]}): ops that read shared layers must run in that "
                "order in every forward, on every rank"
            )
        self.last = pos
        waited = {key: pending.wait() for key, pending in sorted(self.in_flight.pop(pos, {}).items())}

        def issue_ahead() -> None:  # after this op's own fetches: the same order on every rank
            for ahead in range(pos + 1, min(pos + self.prefetch_step, len(self.readers) - 1) + 1):
                if ahead not in self.in_flight:
                    self.in_flight[ahead] = {k: v for m in self.readers[ahead][1] for k, v in _issue_reads(m).items()}

        with _in_scope(_fetch(layers, waited, then=issue_ahead)):
            yield

    def _drain(self) -> None:
        for pos in sorted(self.in_flight):
            for pending in self.in_flight.pop(pos).values():
                pending.wait()


@contextlib.contextmanager
def fetch_layers(*layers: nn.Module):
    """Fetch the whole weights of these shared layers once, here; every read of them inside the block
    uses them, with no collective. Every rank of the sharing group must enter it at the same point
    of every forward with the same layers in the same order (e.g. the first line of a custom op's
    body, before its batch is split): each entry issues one collective per shared parameter.
    Layers that are not shared are ignored. The fetched weights are freed at the block's end."""
    with _in_scope(_fetch(layers)):
        yield


def _fetch(layers, fetched: Optional[dict] = None, then=None) -> dict:
    """``{key: whole weight}`` of ``layers``' shared parameters: those in ``fetched`` as they are, the
    others fetched now, in the layers' order; then ``then()`` (its collectives come after them)."""
    fetched = dict(fetched or {})
    _local.fetching = True
    try:
        for layer in layers:
            for key, read in _shared_reads(layer):
                if key not in fetched:
                    fetched[key] = read()
        if then is not None:
            then()
    finally:
        _local.fetching = False
    return fetched


@contextlib.contextmanager
def _in_scope(fetched: dict):
    """Reads of ``fetched``'s layers inside the block use those weights (``lookup``)."""
    _scopes().append(fetched)
    try:
        yield
    finally:
        _scopes().pop()


@contextlib.contextmanager
def running_graph(graph_id: str, visible: frozenset):
    """While a compiled graph of ours runs: ``visible`` are the keys (``weight_key``) it fetches itself."""
    _graphs().append((graph_id, visible))
    try:
        yield
    finally:
        _graphs().pop()


def _reader() -> str:
    """Who read the layer: the innermost frames outside ascend_compile, torch, the standard library and
    vLLM's linear layers (``f at file:line <- g <- h``), and the custom op they run in where torch
    names it (``torch.library.custom_op``)."""
    import inspect

    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    skip = (ours, os.path.dirname(torch.__file__), os.path.dirname(os.__file__))
    layers = (os.sep + os.path.join("vllm", "model_executor", "layers") + os.sep,
              os.sep + os.path.join("vllm", "model_executor", "parameter.py"))  # the linear layer's own code
    frames, op = [], None
    for info in inspect.stack(context=0)[2:]:
        if op is None and info.filename.endswith(os.path.join("_library", "custom_ops.py")):
            name = getattr(info.frame.f_locals.get("self"), "_qualname", None)
            op = name if name and not name.startswith("ascend_compile::") else None  # not our own marker
        if info.filename.startswith(skip) or any(part in info.filename for part in layers):
            continue
        frames.append(info)
    if not frames:
        return "unknown code"
    first = frames[0]
    chain = " <- ".join([f"{first.function} at {first.filename}:{first.lineno}"] + [f.function for f in frames[1:3]])
    return chain + (f" (custom op {op})" if op else "")


class ForeignBackendError(ShardingError):
    """A sharded model's shared layer was read by a graph Inductor compiled as a backend of its own."""


# Inductor's runtime (output_code.py) and its compile-time folding (freezing, constant_folding): on the
# stack of a read inside a graph Inductor compiled, or folds. Backends that run the traced graph as it
# is (eager, aot_eager, torch._dynamo.explain) keep program order and stay correct.
_REORDERING_COMPILER = os.sep + "_inductor" + os.sep


# set on our pass in vLLM's pass manager (integrations/vllm/pieces.py): a piece vLLM compiled with it
# checked its sliced layers' order
PIECES_PASS_MARK = "_ascend_compile_pieces"
_VLLM_COMPILATION = os.sep + os.path.join("vllm", "compilation") + os.sep


def _checked_vllm_piece(frame) -> bool:
    """A frame of vLLM's piecewise backend (mode 3) whose config holds our pass among vLLM's."""
    if _VLLM_COMPILATION not in frame.f_code.co_filename:
        return False
    config = getattr(getattr(frame.f_locals.get("self"), "compilation_config", None), "inductor_compile_config", None)
    return isinstance(config, dict) and any(getattr(p, PIECES_PASS_MARK, False) for p in config.values())


def _in_vllm_compile() -> bool:
    import sys

    frame = sys._getframe(1)
    while frame is not None and _VLLM_COMPILATION not in frame.f_code.co_filename:
        frame = frame.f_back
    return frame is not None


def _foreign_compiler(sliced: bool = False) -> Optional[str]:
    """Where the read runs, when that is inside Inductor (outside any graph of ours): its file. A
    sliced layer read inside a piece that vLLM compiled with our pass (mode 3) is not foreign: each
    sliced layer is one op, kept in order by its effect, and our pass checked the piece."""
    import sys

    frame, found = sys._getframe(2), None
    while frame is not None:
        if found is None and _REORDERING_COMPILER in frame.f_code.co_filename:
            found = frame.f_code.co_filename
            if not sliced:
                return found
        if found is not None and _checked_vllm_piece(frame):
            return None
        frame = frame.f_back
    return found


def check_read(key: tuple, sliced: bool = False) -> None:
    """Before a read issues a collective: refuse it when a compiled graph of ours is running that
    does not fetch this layer itself and no ``fetch_layers`` block fetched it (an opaque reader),
    and when a graph Inductor compiled as a backend of its own reads it (``ForeignBackendError``)."""
    if getattr(_local, "fetching", False):
        return
    graphs = _graphs()
    if not graphs:
        where = _foreign_compiler(sliced)
        if where is None:
            return  # an eager forward
        group_name, _, layer = key
        error = ForeignBackendError(
            f"shared layer {layer} (group {group_name!r}) was read inside a graph that Inductor compiled as a "
            f"backend of its own ({where}): Inductor reorders the reads of shared layers (reorder_for_peak_memory, "
            "reorder_for_locality), differently on each rank and at each size, and with freezing reads them at "
            "compile time, folding them into constants; ranks whose broadcasts do not pair hang. Compile a sharded "
            "model with backend=\"ascend_compile\" (options={\"lowering\": \"inductor\"} for Inductor; without "
            "freezing), or run it eagerly." + (
                " This graph is a piece of vLLM's compilation mode 3, compiled without ascend_compile's pass in vLLM's "
                "pass manager (inductor_compile_config[current_platform.pass_key]), which the plugin puts there when "
                "additional_config shares sliced layers" if _in_vllm_compile() else "")
        )
        _refuse(group_name, error)
    graph_id, visible = graphs[-1]
    if key in visible:
        return
    group_name, _, layer = key
    error = OpaqueReadError(
        f"shared layer {layer} (group {group_name!r}) was read by {_reader()}, inside an op that compiled graph "
        f"{graph_id} cannot see, outside ascend_compile.fetch_layers: there ranks may read it a different number of "
        "times, and their collectives would not pair. Start the op's body with `with "
        "ascend_compile.fetch_layers(<the shared layers it reads>):` (every rank, at the same point of every "
        "forward), or call the layer outside the op."
    )
    _refuse(group_name, error)


def _refuse(group_name: str, error: Exception) -> None:
    """Raise ``error`` after closing the sharing group: a peer that did not read goes on to a collective
    this rank never joins, and fails at once instead."""
    abort_group(group_name, error)
    raise error
