"""Slices, per forward: one sliced model's path agreement, its gathers in flight, its two paths.

Which path a forward takes is decided once per forward, at the first sliced layer it calls, from the
largest token count of any rank of the group: every rank takes the same path, whatever its own batch.
With ``paths="by_shape"`` each layer's path follows its own input's token count instead, equal on
every rank by contract (checked against vLLM's padded count inside vLLM, and by one all-reduce at
the first sliced layer of a forward that is not captured elsewhere): under capture no agreement, no
host sync, nothing read from this object between layers but the gather path's gathers in flight,
issued and waited in the same order at every forward of a size (what a captured graph replays).
"slices" names the path that computes on the slices and moves activations (forwards of at most
``decode_tokens`` tokens: decode steps, small prefill chunks); "gather" the one that gathers the
weights ahead (larger forwards).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import errors, failing, groups
from .slice_layout import (SLICE_GEMM, cut_name, decode_linear, gather_slices, gather_source, path_collectives,
                           reassemble)

log = logging.getLogger(__name__)

PATHS = ("slices", "gather")


@dataclasses.dataclass
class SlicedLayer:
    series: str  # layer series, e.g. "o_proj"
    index: int
    module: str
    cut: int
    shape: tuple  # the whole weight's [d_out, d_in]


class SliceState:
    """One sliced model's run-time state: the layers in call order, the agreed path of the forward
    under way, and the weight gathers in flight (gather path). Keyed by (group, generation)."""

    def __init__(self, group_name: str, generation: int, layers: list, modules: list, prefetch_step: int,
                 decode_tokens: int, by_shape: bool = False):
        self.group_name = group_name
        self.generation = generation
        self.layers = layers  # [SlicedLayer] in model order: the order the forward calls them
        self.modules = modules  # the sliced modules, by position: their weight is read when gathered (after any update)
        self.position = {(sl.series, sl.index): i for i, sl in enumerate(layers)}
        self.prefetch_step = prefetch_step
        self.decode_tokens = decode_tokens
        self.by_shape = by_shape  # paths="by_shape": each layer's path from its own token count, never agreed
        self.path: Optional[str] = None  # of the forward under way
        self.forward_ref = None  # weakref to vLLM's forward context of the forward under way
        self.tokens = 0  # agreed (largest) token count of the forward under way
        self.in_flight: dict = {}  # position -> (work, buffer)
        self.forwards = {p: 0 for p in PATHS}  # forwards run on each path (dumps, tests, benchmarks)
        self.opaque: set = set()  # positions read inside ops a graph cannot see (fetched whole by opaque.fetch_layers)
        self.captured: dict = {}  # paths="by_shape": token count of each captured graph -> its path
        self.issued = collections.deque(maxlen=4096)  # the latest collectives issued, as text (tests, debugging)

    @property
    def pg(self):
        # looked up by name, never held: an aborted group closes its sockets only once nothing references it
        return groups.group_from_name(self.group_name)

    def _collective(self, what: str, fn):
        try:
            return fn()
        except Exception as e:
            if not errors.is_comm_failure(e):
                raise
            raise failing.peer_error(what, self.group_name, e) from e

    # -- the forward's path ---------------------------------------------------------------------

    @property
    def first(self) -> Optional[int]:
        """The position of the first layer a forward calls through ``linear`` (where its path is agreed):
        layers read inside opaque ops are fetched whole by ``fetch_layers`` and take no part."""
        return next((pos for pos in range(len(self.layers)) if pos not in self.opaque), None)

    def start_forward(self) -> None:
        """A forward starts (the model's entry, a compiled graph's entry, a new vLLM forward context): its
        path is agreed at the first sliced layer it calls, whichever that is."""
        self.path = None

    def _start_on_new_vllm_forward(self) -> None:
        """Start a forward where vLLM says one starts (a new forward context)."""
        ctx = _vllm_forward_context()
        if ctx is not None and (self.forward_ref is None or self.forward_ref() is not ctx):
            self.forward_ref = weakref.ref(ctx)
            self.start_forward()

    def mark_opaque(self, pos: int) -> None:
        """Layer ``pos`` is read inside an op the graph cannot see: from now on it is fetched whole where
        that op starts (every rank marks it at the same ``fetch_layers`` entry), never gathered ahead."""
        self.opaque.add(pos)

    def whole(self, pos: int) -> torch.Tensor:
        """Layer ``pos``'s whole weight, gathered now (``fetch_layers``)."""
        return self._wait_whole(pos, *self.issue_gather(pos, None))

    def _wait_whole(self, pos: int, work, buf: torch.Tensor) -> torch.Tensor:
        self._collective(f"the gather of {self.layers[pos].module}'s slices", work.wait)
        return self.whole_of(pos, buf)

    def whole_of(self, pos: int, buf: torch.Tensor) -> torch.Tensor:
        """Layer ``pos``'s whole weight (a view) from its gathered buffer."""
        return reassemble(buf, self.layers[pos].cut)

    def begin_forward(self, tokens: int, device: torch.device) -> None:
        """At the first sliced layer of a forward: agree on the largest token count, pick the path."""
        self.wait_in_flight()
        agreed = _vllm_tokens_across_dp()
        if agreed is not None and agreed >= tokens:  # vLLM's DP padding agreed already: no collective, no sync
            self.tokens, source = agreed, " (vLLM's num_tokens_across_dp)"
        else:
            count = torch.tensor([tokens], dtype=torch.int64, device=device)
            self._collective("the token-count agreement of a sliced forward",
                             lambda: dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.pg))
            self.tokens, source = int(count.item()), ""
        self.path = "slices" if self.tokens <= self.decode_tokens else "gather"
        self.forwards[self.path] += 1
        self.issued.append(f"agree{source} -> {self.tokens} tokens, {self.path}")
        if self.forwards[self.path] == 1:
            log.info("ascend_compile: rank %d of group %s: first sliced forward on the %s path: %d tokens (the most of "
                     "any rank), %s decode_tokens=%d", dist.get_rank(self.pg), self.group_name, self.path, self.tokens,
                     "at most" if self.path == "slices" else "above", self.decode_tokens)

    def wait_in_flight(self) -> list:
        """Wait for (and forget) gathers left by a forward that stopped early; returns their positions."""
        left = sorted(self.in_flight)
        for pos in left:
            work, _ = self.in_flight.pop(pos)
            self._collective("a weight gather left in flight", work.wait)
        return left

    # -- the two paths --------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], series: str, index: int) -> torch.Tensor:
        pos = self.position[(series, index)]
        tokens = x.numel() // x.shape[-1] if x.dim() else 1
        if self.by_shape:
            return self._linear_by_shape(x, w, b, pos, tokens)
        self._start_on_new_vllm_forward()
        if pos == self.first or self.path is None:
            self.begin_forward(tokens, w.device)
        layer = self.layers[pos]
        gemm = getattr(self.modules[pos], SLICE_GEMM, None)
        if self.path == "gather" and gemm is None:
            return F.linear(x, self.gathered_weight(pos, w), b)
        if tokens > self.tokens:
            error = RuntimeError(
                f"sliced layer {layer.module} got {tokens} tokens, more than the {self.tokens} its forward agreed on at "
                f"its first sliced layer ({self.layers[0].module}): every sliced layer of a forward must see the same "
                "tokens"
            )
            raise error  # sliced_linear aborts the group: the peers wait in this layer's collectives
        return self._on_slices(x, w, b, pos, self.tokens, gemm)

    def _on_slices(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], pos: int, tokens: int,
                gemm) -> torch.Tensor:
        """Layer ``pos`` on the slices path: ``x`` computed on the slices, its rows padded to ``tokens``
        (the count every rank of the group passes here)."""
        layer = self.layers[pos]
        self.issued.append(f"slices {layer.module} ({cut_name(layer.cut)} cut)")
        out = decode_linear(x.reshape(-1, x.shape[-1]), w, layer.cut, tokens, self.pg, self._collective,
                            layer.module, gemm)
        out = out.reshape(*x.shape[:-1], layer.shape[0])
        return out + b if b is not None else out

    def path_of(self, tokens: int) -> str:
        """``paths="by_shape"``: the path of a layer whose input has ``tokens`` tokens."""
        return "slices" if tokens <= self.decode_tokens else "gather"

    def _linear_by_shape(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], pos: int,
                         tokens: int) -> torch.Tensor:
        """``paths="by_shape"``: the path of this layer's own (static, equal on every rank) token count."""
        layer = self.layers[pos]
        padded = _vllm_tokens_across_dp()
        if padded is not None and padded != tokens:  # read while tracing or capturing, never at a replay
            raise RuntimeError(
                f"sliced layer {layer.module} got {tokens} tokens where vLLM's data-parallel padding gives {padded}: "
                "paths='by_shape' needs every rank of the group to run the same token count in every forward (vLLM "
                "pads to it under graph capture); set paths='agreed' for forwards of different sizes"
            )
        path = self.path_of(tokens)
        gemm = getattr(self.modules[pos], SLICE_GEMM, None)
        if pos == self.first:
            in_capture = capturing()
            if padded is None and not in_capture:
                self._check_same_tokens(tokens, x.device, layer.module)
            self.wait_in_flight()  # none, unless an earlier forward stopped halfway
            self.forwards[path] += 1
            self.issued.append(f"by shape -> {tokens} tokens, {path}")
            if in_capture and tokens not in self.captured:  # a replay runs no Python: say it now
                self.captured[tokens] = path
                issues = sorted({f"{cut_name(sl.cut)}-cut layers {', '.join(path_collectives(sl.cut, path))}"
                                 for sl in self.layers})
                log.info("ascend_compile: rank %d of group %s: a graph captured at %d tokens takes the %s path in every "
                         "sliced layer (%s)", dist.get_rank(self.pg), self.group_name, tokens, path, "; ".join(issues))
        if path == "gather" and gemm is None:
            return F.linear(x, self.gathered_weight(pos, w), b)
        return self._on_slices(x, w, b, pos, tokens, gemm)

    def _check_same_tokens(self, tokens: int, device, module: str) -> None:
        """``paths="by_shape"`` outside vLLM and outside capture (eager forwards, compiled ones not
        captured, a captured graph's warm-up): one all-reduce checks that every rank of the group runs
        ``tokens``. Ranks with different counts would issue collectives of different sizes (a hang, or
        wrong results); every rank sees both extremes, so all raise together."""
        extremes = torch.tensor([tokens, -tokens], dtype=torch.int64, device=device)
        self._collective("the token-count check of paths='by_shape'",
                         lambda: dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.pg))
        most, fewest = int(extremes[0].item()), -int(extremes[1].item())
        if most != fewest:
            raise RuntimeError(
                f"sliced layer {module}: the ranks of group {self.group_name} run between {fewest} and {most} tokens in "
                f"this forward (this rank {tokens}), and paths='by_shape' takes each layer's path from its own token "
                "count, which must be equal on every rank (as vLLM's data-parallel padding makes it under graph "
                "capture): set paths='agreed' for forwards of different sizes, or pad every rank's batch to one size"
            )

    def gathered_weight(self, pos: int, w: torch.Tensor) -> torch.Tensor:
        """Layer ``pos``'s whole weight on the gather path. The gathers of a forward on it follow ``prefetch_step`` = k
        per series, as ``layout="layers"`` broadcasts: layers ``0..k-1`` of every series at the
        forward's first sliced layer, then layer ``i + k`` of a series when its layer ``i`` is used. While
        a device graph is being captured, each layer is gathered at its use instead: a captured graph
        (one of vLLM's pieces) replays alone, so nothing it issues may be waited in another."""
        if capturing():
            return self._wait_whole(pos, *self.issue_gather(pos, w))
        if pos == self.first:
            for early in range(len(self.layers)):
                if (self.layers[early].index < self.prefetch_step and early not in self.in_flight
                        and self.gathers_ahead(early)):
                    self.in_flight[early] = self.issue_gather(early, w if early == pos else None, early != pos)
        if pos not in self.in_flight:
            self.in_flight[pos] = self.issue_gather(pos, w)
        layer = self.layers[pos]
        ahead = self.position.get((layer.series, layer.index + self.prefetch_step))
        if self.prefetch_step and ahead is not None and ahead not in self.in_flight and self.gathers_ahead(ahead):
            self.in_flight[ahead] = self.issue_gather(ahead, None, True)
        return self._wait_whole(pos, *self.in_flight.pop(pos))

    def can_gather(self, pos: int) -> bool:
        """Whether layer ``pos`` can be gathered (not when it computes with its own GEMM)."""
        return getattr(self.modules[pos], SLICE_GEMM, None) is None

    def gathers_ahead(self, pos: int) -> bool:
        """Whether a forward on the gather path gathers layer ``pos`` ahead of its use (not one read inside an opaque op)."""
        return self.can_gather(pos) and pos not in self.opaque

    def issue_gather(self, pos: int, w: Optional[torch.Tensor], ahead: bool = False):
        """Start gathering layer ``pos``'s slices (``ahead``: of a later layer than the one in use)."""
        w = gather_source(self.layers[pos].cut, self.modules[pos].weight if w is None else w).contiguous()
        buf = torch.empty((w.shape[0] * self.pg.size(), w.shape[1]), dtype=w.dtype, device=w.device)
        self.issued.append(f"gather {self.layers[pos].module}" + (" ahead" if ahead else ""))
        work = self._collective(f"the gather of {self.layers[pos].module}'s slices",
                                lambda: gather_slices(buf, w, self.pg, async_op=True))
        return work, buf


def capturing() -> bool:
    """Whether this thread's device stream is being captured into a graph (CUDA, or Ascend's ACL
    graphs through ``torch.npu``); False on CPU and wherever the device cannot say."""
    for name in ("npu", "cuda"):
        device = getattr(torch, name, None)
        check = getattr(device, "is_current_stream_capturing", None)
        if check is None or not device.is_available():
            continue
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - a build without that device
            continue
    return False


def _vllm_forward_context():
    """vLLM's forward context of the forward under way (one object per forward), or None outside vLLM."""
    import sys

    module = sys.modules.get("vllm.forward_context")
    if module is None or not module.is_forward_context_available():
        return None
    return module.get_forward_context()


def _vllm_tokens_across_dp():
    """The largest token count of any data-parallel rank in the forward under way, as vLLM agreed it
    (``forward_context.dp_metadata.num_tokens_across_dp_cpu``; vLLM 0.23 makes it for MoE models with
    data parallelism, the same on every rank), or None. The sharing group is the DP group or a part of
    it (tensor parallelism is refused for slices), so the largest count over DP bounds every peer's."""
    ctx = _vllm_forward_context()
    across = getattr(getattr(ctx, "dp_metadata", None), "num_tokens_across_dp_cpu", None)
    return int(across.max()) if across is not None and across.numel() else None
