"""``layout="slices"``: every rank keeps ``1/K`` of every layer of a series, and each forward
either moves activations (few tokens) or gathers the weights ahead (many tokens).

A series is cut along the dimension that moves fewer bytes at decode (DESIGN.md section 5b):

- ``d_in > d_out`` (``o_proj``-like), **input cut**: rank ``r`` keeps columns ``[r*c, (r+1)*c)``
  of the weight. Decode: all-to-all the inputs' column blocks, GEMM on the resident block,
  reduce-scatter the partial outputs.
- otherwise (``q_b_proj``-like), **output cut**: rank ``r`` keeps rows ``[r*c, (r+1)*c)``.
  Decode: all-gather the inputs, GEMM on the resident rows, all-to-all the outputs back.

Prefill: the slices of layer ``j + k`` are all-gathered (every link busy) while layer ``j``
computes, and the layer computes as replicated on the whole weight (bitwise equal to it).

Which path a forward takes is decided once per forward, at the call of the model's first sliced
layer, from the largest token count of any rank of the group (an all-reduce of one integer that
every rank issues at the same point of every forward): every rank takes the same path, whatever
its own batch. Ranks with fewer tokens pad to that count in the decode collectives. Bias stays
whole on every rank (``d_out`` elements).

Every read of a sliced layer goes through ``ascend_compile::sliced_linear``, an op with an ordered
effect: backends keep sliced layers in program order (the collectives inside them must be issued
in the same order on every rank), and the op is opaque to every backend (correct under any).
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
from torch import nn

from ..config import ConfigError
from . import comm

log = logging.getLogger(__name__)

INPUT_CUT, OUTPUT_CUT = 1, 0
PATHS = ("decode", "prefill")
AUTO_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# {"cut": cut, "whole": (d_out, d_in), "shapes": {param: whole shape}} of a layer an integration sliced
# before loading (vLLM: its parameters are already this rank's slices, its own code routes the GEMM
# through sliced_linear); "shapes" names every parameter that was cut (the weight, and per-channel
# scales along the cut)
PRESLICED = "_ascend_compile_presliced"
# a layer's own GEMM on its slice (an integration's, e.g. a vLLM quant method's apply): such a layer
# computes on its slice at every token count, never gathered (its processed layout may not reassemble)
SLICE_GEMM = "_ascend_compile_slice_gemm"


def whole_shape(module: nn.Module, w: torch.Tensor) -> tuple:
    """The ``[d_out, d_in]`` of the layer's whole weight (``w``: the weight it holds)."""
    presliced = getattr(module, PRESLICED, None)
    return tuple(presliced["whole"]) if presliced is not None else tuple(w.shape)


def shared_params(module: nn.Module, params: dict, world: int) -> dict:
    """``{param: (tensor, whole shape, whole bytes)}`` of what a series member shares, in either
    layout: the configured ``params``, or for a layer an integration sliced at load every parameter
    that was cut (its other parameters, e.g. per-output-channel scales of an input cut, stay whole on
    every rank)."""
    presliced = getattr(module, PRESLICED, None)
    if presliced is None:
        return {k: (p, tuple(p.shape), p.numel() * p.element_size()) for k, p in params.items()}
    own = dict(module.named_parameters(recurse=False))
    # bytes from the slice as processed (processing may change layout or dtype), times the ranks
    return {k: (own[k], tuple(shape), own[k].numel() * own[k].element_size() * world)
            for k, shape in presliced["shapes"].items()}


def cut_of(shape: tuple) -> int:
    """The weight dimension a ``[d_out, d_in]`` weight is cut along: the input (1) when
    ``d_in > d_out``, else the output (0)."""
    d_out, d_in = shape
    return INPUT_CUT if d_in > d_out else OUTPUT_CUT


def cut_name(cut: int) -> str:
    return "input" if cut == INPUT_CUT else "output"


def check_sliceable(series: str, members: list, world: int) -> None:
    """``members``: ``[(module name, module, {param: tensor})]``. Only a plain linear layer
    (``y = x @ W.T + b``, forward not overridden) whose cut dimension divides by the group's size
    can be computed on slices; anything else is refused, naming the layer and the way out."""
    for name, module, params in members:
        if hasattr(module, PRESLICED):
            continue  # sliced at load by an integration, which checked it (vLLM: slicing.check_vllm_sliceable)
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            raise ConfigError(
                f"layout='slices' computes {name} as x @ W.T + b on a slice of W, but it is a "
                f"{type(module).__name__} with its own forward (quantized or vLLM layers are not sliced yet): "
                "use SharedWeightConfig(layout='layers') for this series"
            )
        if set(params) != {"weight"}:
            raise ConfigError(
                f"layout='slices' cuts the weight only (the bias stays whole on every rank), but series {series!r} "
                f"shares {sorted(params)}: drop SharedWeightConfig(params=...) or set params=['weight']"
            )
    d_out, d_in = whole_shape(members[0][1], members[0][2]["weight"])
    cut = cut_of((d_out, d_in))
    dim = d_in if cut == INPUT_CUT else d_out
    if dim % world:
        raise ConfigError(
            f"layout='slices' cuts series {series!r} ({d_out}x{d_in}) along its {cut_name(cut)} dimension, {dim}, "
            f"which does not divide into {world} ranks: use SharedWeightConfig(layout='layers') for it"
        )


@dataclasses.dataclass
class SlicedLayer:
    series: str  # layer series, e.g. "o_proj"
    index: int
    module: str
    cut: int
    shape: tuple  # the whole weight's [d_out, d_in]


class SliceState:
    """One sliced model's run-time state: the layers in call order, the agreed path of the forward
    under way, and the weight gathers in flight (prefill). Keyed by (group, generation)."""

    def __init__(self, group_name: str, generation: int, layers: list, modules: list, prefetch_step: int,
                 decode_tokens: int):
        self.group_name = group_name
        self.generation = generation
        self.layers = layers  # [SlicedLayer] in model order: the order the forward calls them
        self.modules = modules  # the sliced modules, by position: their weight is read when gathered (after any update)
        self.position = {(sl.series, sl.index): i for i, sl in enumerate(layers)}
        self.prefetch_step = prefetch_step
        self.decode_tokens = decode_tokens
        self.path: Optional[str] = None  # of the forward under way
        self.forward_ref = None  # weakref to vLLM's forward context of the forward under way
        self.tokens = 0  # agreed (largest) token count of the forward under way
        self.in_flight: dict = {}  # position -> (work, buffer)
        self.forwards = {p: 0 for p in PATHS}  # forwards run on each path (dumps, tests, benchmarks)
        self.opaque: set = set()  # positions read inside ops a graph cannot see (fetched whole by opaque.fetch_layers)
        self.issued = collections.deque(maxlen=4096)  # the latest collectives issued, as text (tests, debugging)

    @property
    def pg(self):
        # looked up by name, never held: an aborted group closes its sockets only once nothing references it
        return comm.group_from_name(self.group_name)

    def _collective(self, what: str, fn):
        try:
            return fn()
        except Exception as e:
            if not comm.is_comm_failure(e):
                raise
            raise comm.peer_error(what, self.group_name, e) from e

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
        return whole_weight(buf, self.layers[pos].cut, self.layers[pos].shape, self.pg.size())

    def begin_forward(self, tokens: int, device: torch.device) -> None:
        """At the first sliced layer of a forward: agree on the largest token count, pick the path."""
        self.drop_in_flight()
        agreed = _vllm_tokens_across_dp()
        if agreed is not None and agreed >= tokens:  # vLLM's DP padding agreed already: no collective, no sync
            self.tokens, source = agreed, " (vLLM's num_tokens_across_dp)"
        else:
            count = torch.tensor([tokens], dtype=torch.int64, device=device)
            self._collective("the token-count agreement of a sliced forward",
                             lambda: dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.pg))
            self.tokens, source = int(count.item()), ""
        self.path = "decode" if self.tokens <= self.decode_tokens else "prefill"
        self.forwards[self.path] += 1
        self.issued.append(f"agree{source} -> {self.tokens} tokens, {self.path}")
        if self.forwards[self.path] == 1:
            log.info("ascend_compile: rank %d of group %s: first sliced forward on the %s path: %d tokens (the most of "
                     "any rank), %s decode_tokens=%d", dist.get_rank(self.pg), self.group_name, self.path, self.tokens,
                     "at most" if self.path == "decode" else "above", self.decode_tokens)

    def drop_in_flight(self) -> list:
        """Wait for gathers left by a forward that stopped early; returns their positions."""
        left = sorted(self.in_flight)
        for pos in left:
            work, _ = self.in_flight.pop(pos)
            self._collective("a weight gather left in flight", work.wait)
        return left

    # -- the two paths --------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], series: str, index: int) -> torch.Tensor:
        pos = self.position[(series, index)]
        tokens = x.numel() // x.shape[-1] if x.dim() else 1
        self._start_on_new_vllm_forward()
        if pos == self.first or self.path is None:
            self.begin_forward(tokens, w.device)
        layer = self.layers[pos]
        gemm = getattr(self.modules[pos], SLICE_GEMM, None)
        if self.path == "prefill" and gemm is None:
            return F.linear(x, self.gathered(pos, w), b)
        if tokens > self.tokens:
            error = RuntimeError(
                f"sliced layer {layer.module} got {tokens} tokens, more than the {self.tokens} its forward agreed on at "
                f"its first sliced layer ({self.layers[0].module}): every sliced layer of a forward must see the same "
                "tokens"
            )
            raise error  # sliced_linear aborts the group: the peers wait in this layer's collectives
        self.issued.append(f"decode {layer.module} ({cut_name(layer.cut)} cut)")
        x2 = x.reshape(tokens, x.shape[-1])
        out = decode_linear(x2, w, layer.cut, self.tokens, self.pg, self._collective, layer.module, gemm)
        out = out.reshape(*x.shape[:-1], layer.shape[0])
        return out + b if b is not None else out

    def gathered(self, pos: int, w: torch.Tensor) -> torch.Tensor:
        """Layer ``pos``'s whole weight. The gathers of a prefill forward follow ``prefetch_step`` = k
        per series, as ``layout="layers"`` broadcasts: layers ``0..k-1`` of every series at the
        forward's first sliced layer, then layer ``i + k`` of a series when its layer ``i`` is used."""
        if pos == self.first:
            for early in range(len(self.layers)):
                if (self.layers[early].index < self.prefetch_step and early not in self.in_flight
                        and self.gathered_ahead(early)):
                    self.in_flight[early] = self.issue_gather(early, w if early == pos else None)
        if pos not in self.in_flight:
            self.in_flight[pos] = self.issue_gather(pos, w)
        layer = self.layers[pos]
        ahead = self.position.get((layer.series, layer.index + self.prefetch_step))
        if self.prefetch_step and ahead is not None and ahead not in self.in_flight and self.gathered_ahead(ahead):
            self.in_flight[ahead] = self.issue_gather(ahead, None)
        return self._wait_whole(pos, *self.in_flight.pop(pos))

    def gathers(self, pos: int) -> bool:
        """Whether layer ``pos`` can be gathered (not when it computes with its own GEMM)."""
        return getattr(self.modules[pos], SLICE_GEMM, None) is None

    def gathered_ahead(self, pos: int) -> bool:
        """Whether a prefill forward gathers layer ``pos`` ahead of its use (not one read inside an opaque op)."""
        return self.gathers(pos) and pos not in self.opaque

    def issue_gather(self, pos: int, w: Optional[torch.Tensor]):
        w = gather_source(self.layers[pos].cut, self.modules[pos].weight if w is None else w).contiguous()
        buf = torch.empty((w.shape[0] * self.pg.size(), w.shape[1]), dtype=w.dtype, device=w.device)
        self.issued.append(f"gather {self.layers[pos].module}")
        work = self._collective(f"the gather of {self.layers[pos].module}'s slices",
                                lambda: gather_slices(buf, w, self.pg, async_op=True))
        return work, buf


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


class _Works:
    """Several async collectives waited as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        return True


# process-group backends on which a gather is one broadcast per rank instead of an all-gather
BROADCAST_GATHER_BACKENDS = ("gloo",)


def gather_slices(buf: torch.Tensor, w: torch.Tensor, pg, async_op: bool = False):
    """Every rank's ``w`` stacked along dim 0 into ``buf``. An all-gather (HCCL, NCCL), except on gloo,
    whose all-gather took 1.7x the time of one broadcast per rank on these CPU machines (8 MB, 2
    ranks): there each rank broadcasts its slice into its block of ``buf``
    (``BROADCAST_GATHER_BACKENDS``)."""
    if dist.get_backend(pg) not in BROADCAST_GATHER_BACKENDS:
        return dist.all_gather_into_tensor(buf, w, group=pg, async_op=async_op)
    rows, rank = w.shape[0], dist.get_rank(pg)
    buf[rank * rows:(rank + 1) * rows].copy_(w)
    works = [dist.broadcast(buf[s * rows:(s + 1) * rows], group_src=s, group=pg, async_op=True)
             for s in range(pg.size())]
    done = _Works(works)
    if not async_op:
        done.wait()
        return None
    return done


def gather_source(cut: int, w: torch.Tensor) -> torch.Tensor:
    """What a rank sends of its slice ``w`` (the layer's ``[d_out, d_in / K]`` or ``[d_out / K, d_in]``
    weight): a contiguous block whose stacking along dim 0 over the ranks is the whole weight (output
    cut) or its transpose (input cut: the slice is stored as a block of rows of ``W.T``, so the
    gathered weight needs no copy to be used)."""
    return w.t() if cut == INPUT_CUT else w


def whole_weight(gathered: torch.Tensor, cut: int, shape: tuple, world: int) -> torch.Tensor:
    """The ``[d_out, d_in]`` weight (a view) from the ranks' ``gather_source`` stacked along dim 0."""
    return gathered.t() if cut == INPUT_CUT else gathered


def decode_linear(x: torch.Tensor, w: torch.Tensor, cut: int, tokens: int, pg, collective, name: str = "",
                  gemm=None) -> torch.Tensor:
    """``x @ W.T`` for this rank's ``x`` (``[n, d_in]``, ``n <= tokens``) from every rank's slice
    of ``W``, moving activations only; every rank calls it with the same ``tokens``. ``gemm``: the
    layer's own product with its slice (``SLICE_GEMM``), instead of ``F.linear(., w)``."""
    gemm = gemm or (lambda inp: F.linear(inp, w))
    world = pg.size()
    n, d_in = x.shape
    padded = x if n == tokens else torch.cat([x, x.new_zeros(tokens - n, d_in)])
    if cut == INPUT_CUT:
        c = d_in // world
        send = padded.view(tokens, world, c).transpose(0, 1).contiguous().view(world * tokens, c)
        recv = torch.empty_like(send)
        collective(f"the all-to-all of {name}'s inputs", lambda: dist.all_to_all_single(recv, send, group=pg))
        partial = gemm(recv)  # [world * tokens, d_out]: every rank's rows, this rank's input block
        out = partial.new_empty((tokens, partial.shape[1]))
        collective(f"the reduce-scatter of {name}'s outputs",
                   lambda: dist.reduce_scatter_tensor(out, partial, group=pg))
        return out[:n]
    inputs = padded.new_empty((world * tokens, d_in))
    collective(f"the all-gather of {name}'s inputs", lambda: dist.all_gather_into_tensor(inputs, padded.contiguous(), group=pg))
    partial = gemm(inputs)  # [world * tokens, c]: every rank's rows, this rank's output block
    recv = torch.empty_like(partial)
    collective(f"the all-to-all of {name}'s outputs", lambda: dist.all_to_all_single(recv, partial, group=pg))
    c = partial.shape[1]
    return recv.view(world, tokens, c).permute(1, 0, 2).reshape(tokens, world * c)[:n]


_STATES: dict = {}


def state_of(group_name: str, generation: int) -> SliceState:
    try:
        return _STATES[(group_name, generation)]
    except KeyError:
        raise RuntimeError(
            f"no sliced model is known for group {group_name!r} (sharding {generation}) in this process: "
            "shard the model (ascend_compile.shard_model) in the process that runs it"
        ) from None


def states_over(group_name: str) -> list:
    return [s for (g, _), s in _STATES.items() if g == group_name]


@torch.library.custom_op("ascend_compile::sliced_linear", mutates_args=())
def sliced_linear(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], series: str, index: int, group_name: str,
    generation: int, out_features: int,
) -> torch.Tensor:
    """``F.linear(x, W, b)`` for the layer whose slice of ``W`` this rank holds as ``w``."""
    from . import opaque

    key = opaque.sliced_key(series, index, group_name, generation)
    whole = opaque.lookup(key)
    if whole is not None:  # inside fetch_layers: gathered once where the opaque op started
        return F.linear(x, whole, b)
    opaque.check_read(key)
    state = state_of(group_name, generation)
    try:
        return state.linear(x, w, b, series, index)
    except comm.PeerError:
        raise
    except Exception as e:
        comm.abort_group(group_name, e)  # this rank stops inside a forward: its peers' collectives fail at once
        raise


@sliced_linear.register_fake
def _(x, w, b, series, index, group_name, generation, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _register_effect() -> None:
    """Ordered effect: AOTAutograd threads a token through every call, so no backend reorders them."""
    from torch._higher_order_ops.effects import _EffectType, _register_effectful_op

    if hasattr(sliced_linear, "register_effect"):
        sliced_linear.register_effect(_EffectType.ORDERED)
    else:  # the function the method calls
        _register_effectful_op("ascend_compile::sliced_linear", _EffectType.ORDERED)


_register_effect()


def sliced_targets() -> tuple:
    packet = torch.ops.ascend_compile.sliced_linear
    return (packet, packet.default)


def _sliced_forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.ascend_compile.sliced_linear(x, self.weight, self.bias, *self._ascend_compile_slice)


_CLASSES: dict = {}


def _sliced_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Sliced{cls.__name__}", (cls,), {
            "forward": _sliced_forward,
            "extra_repr": lambda self: (f"{cls.extra_repr(self)}, slice={self._ascend_compile_slice[0]}"
                                        f"[{self._ascend_compile_slice[1]}] ({self._ascend_compile_cut} cut)"),
        })
    return _CLASSES[cls]


def slice_modules(per_layer: dict, model_order: dict, rank: int, world: int, group_name: str, generation: int) -> list:
    """Keep this rank's slice of each layer's weight (the rest of its storage is freed) and route the
    layer's forward through ``sliced_linear`` (a layer sliced at load, ``PRESLICED``, already holds
    its slice and routes its GEMM itself). ``model_order``: module name -> its position in the
    model (the order a forward calls the layers). Returns ``[(SlicedLayer, module)]`` in that order."""
    layers = []
    for series, members in per_layer.items():
        for index, (mname, module, params) in enumerate(members):
            w = params["weight"]
            whole = whole_shape(module, w)
            cut = cut_of(whole)
            if not hasattr(module, PRESLICED):
                size = w.shape[cut] // world
                part = w.detach().narrow(cut, rank * size, size)
                # own storage, laid out as gather_source sends it: for an input cut, rows of W.T
                part = part.t().contiguous().t() if cut == INPUT_CUT else part.clone(memory_format=torch.contiguous_format)
                module._parameters["weight"] = nn.Parameter(part, requires_grad=False)
                module.__class__ = _sliced_class(type(module))
            if getattr(module, "bias", None) is not None:
                module.bias.requires_grad_(False)
            module._ascend_compile_slice = (series, index, group_name, generation, whole[0])
            module._ascend_compile_cut = cut_name(cut)
            layers.append((mname, SlicedLayer(series, index, mname, cut, whole), module))
    layers.sort(key=lambda t: model_order[t[0]])
    return [(sl, module) for _, sl, module in layers]


def install(group_name: str, generation: int, layers: list, prefetch_step: int, decode_tokens: int) -> SliceState:
    """``layers``: ``[(SlicedLayer, module)]`` in model order."""
    state = SliceState(group_name, generation, [sl for sl, _ in layers], [m for _, m in layers], prefetch_step,
                       decode_tokens)
    _STATES[(group_name, generation)] = state
    return state


# -- the decode threshold ("auto") --------------------------------------------------------------


def measure_paths(pg, layers: list, prefetch_step: int, reps: int = 3) -> dict:
    """Per decoder layer (one layer of each series), seconds of the decode path at each candidate
    token count, of the weight gathers, and of the replicated GEMMs. Collectives: every rank runs
    the same sequence. Layers with their own GEMM (``SLICE_GEMM``) take no part: they compute on
    their slices whatever the threshold. None when no layer is left."""
    world = pg.size()
    first = {}
    for sl, module in layers:
        if getattr(module, SLICE_GEMM, None) is None:
            first.setdefault(sl.series, (sl, gather_source(sl.cut, module.weight)))
    if not first:
        return None

    from .timing import time_call

    device = next(iter(first.values()))[1].device

    def timed(fn) -> float:  # the work's time, not its launch's: the device is synchronised around it
        return time_call(fn, device, reps=reps)

    def run(what, fn):  # decode_linear's collective hook, with no error translation here
        return fn()

    decode, gemm, gather = {}, {}, 0.0
    whole = {}
    for series, (sl, w) in first.items():
        buf = torch.empty((w.shape[0] * world, w.shape[1]), dtype=w.dtype, device=w.device)
        gather += timed(lambda: gather_slices(buf, w, pg))  # w: as gathered (gather_source)
        whole[series] = whole_weight(buf, sl.cut, sl.shape, world)
    for n in AUTO_CANDIDATES:
        decode[n], gemm[n] = 0.0, 0.0
        for series, (sl, w) in first.items():
            x = torch.randn(n, sl.shape[1], dtype=w.dtype, device=w.device)
            dist.barrier(group=pg)
            decode[n] += timed(lambda: decode_linear(x, gather_source(sl.cut, w), sl.cut, n, pg, run))
            gemm[n] += timed(lambda: F.linear(x, whole[series]))
    return {"decode": decode, "gemm": gemm, "gather": gather, "prefetch_step": prefetch_step}


def choose_threshold(costs: dict) -> tuple:
    """``(decode_tokens, explanation)`` from agreed measurements: the largest candidate token count up
    to which the decode path is no slower than the prefill path (the gathers overlap the GEMMs when
    prefetching ahead: ``max(gather, gemm)``; at step 0 they add up)."""
    overlap = costs["prefetch_step"] > 0
    chosen, winning = 0, True
    rows = []
    for n in sorted(costs["decode"], key=int):
        prefill = max(costs["gather"], costs["gemm"][n]) if overlap else costs["gather"] + costs["gemm"][n]
        rows.append(f"{n}: decode {costs['decode'][n] * 1e3:.2f} ms, prefill {prefill * 1e3:.2f} ms")
        winning = winning and costs["decode"][n] <= prefill
        if winning:
            chosen = int(n)
    return chosen, "; ".join(rows)


def agree_costs(gathered: list) -> dict:
    """The slowest rank's time for every entry: every rank computes the same threshold."""
    first = gathered[0]
    return {
        "decode": {n: max(g["decode"][n] for g in gathered) for n in first["decode"]},
        "gemm": {n: max(g["gemm"][n] for g in gathered) for n in first["gemm"]},
        "gather": max(g["gather"] for g in gathered),
        "prefetch_step": first["prefetch_step"],
    }
