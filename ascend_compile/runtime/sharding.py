"""``shard_model``: keep each repeated layer's parameters on one rank, route reads through the marker op.

Layer ``i`` of a series is owned by group rank ``i % K``. The owner keeps its real tensor;
every other rank keeps a storage-less stand-in of the same shape and dtype (a 0-dim tensor
expanded to the shape: one element of storage). Reads go through a parametrization whose
forward is the ``shared_weight`` marker op, so eager forwards and our compiler see the
same program.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from ..config import ConfigError, SharedWeightConfig
from . import blocks, errors, failing, formats, groups, slice_layout, slice_measure, slice_state, slices, state, windows
from .errors import ShardingError
from .marker import AUTO_STEP, Marker, layer_name, series_windows
from .series import series_members, standin_like

PLAN_ATTR = "_ascend_compile_plan"
EVERY_RANK = -1  # SharedParam.owner of a sliced parameter (layout="slices"): every rank holds a slice


@dataclasses.dataclass(frozen=True)
class SharedParam:
    """One parameter of one layer: the unit that is broadcast."""

    series: str  # "<layer series>.<param name>", e.g. "o_proj.weight"
    index: int
    owner: int  # group rank holding the whole parameter, or EVERY_RANK (a slice on each)
    module: str
    param: str
    shape: tuple
    dtype: str
    nbytes: int


@dataclasses.dataclass
class ShardPlan:
    """What ``shard_model`` did, identical on every rank except ``rank``."""

    group_name: str
    rank: int
    world_size: int
    prefetch_step: int
    layer_series: dict  # layer series name -> [module names in index order]
    params: list  # [SharedParam]
    formats: dict = dataclasses.field(default_factory=dict)  # "series[index]" -> NPU format, if not row-major
    wrap_windows: int = 0  # windows per series prefetched for the next forward (wrap-around)
    generation: int = 0  # this sharding's number over its group (agreed at shard time)
    layout: str = "layers"  # or "slices": every rank keeps 1/world_size of every layer
    decode_tokens: Optional[int] = None  # slices: the largest agreed token count computed on the slices
    decode_explanation: str = ""  # slices with decode_tokens="auto": the measurements behind the choice
    paths: Optional[str] = None  # slices: "agreed" or "by_shape" (SharedWeightConfig.paths)
    block: int = 0  # share_size: this rank's block of the user's group (rank, world_size: within the block)
    blocks: int = 1  # how many blocks the user's group splits into

    def series_bytes(self) -> int:
        """Bytes of all shared parameters, as a replicated model holds them on every rank."""
        return sum(p.nbytes for p in self.params)

    def owned_bytes(self, rank: Optional[int] = None) -> int:
        if self.layout == "slices":
            return sum(p.nbytes // self.world_size for p in self.params)
        rank = self.rank if rank is None else rank
        return sum(p.nbytes for p in self.params if p.owner == rank)

    def saved_bytes(self, rank: Optional[int] = None) -> int:
        """Bytes this rank no longer stores."""
        return self.series_bytes() - self.owned_bytes(rank)

    def window_bytes(self) -> int:
        """Bytes of the wrap-around windows held between forwards (the first ``wrap_windows``
        layers of every series; a rank holds them whether it owns them or not)."""
        lengths = self.series_lengths()
        return sum(p.nbytes for p in self.params if p.index < series_windows(self.wrap_windows, lengths[p.series]))

    def series_lengths(self) -> dict:
        """``{series: layers}`` of every shared parameter series (``"o_proj.weight"``)."""
        lengths: dict = {}
        for p in self.params:
            lengths[p.series] = max(lengths.get(p.series, 0), p.index + 1)
        return lengths

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["params"] = [dataclasses.asdict(p) for p in self.params]
        return d


class SharedWeight(nn.Module):
    """Parametrization: the parameter's value is the owner's tensor, fetched by the marker op."""

    def __init__(self, marker: Marker, sharding: "state.Sharding"):
        super().__init__()
        self.marker = marker
        self.sharding = sharding  # the model's Sharding: its run-time state
        self.args = marker.args()  # plain values: what Dynamo traces into the graph
        for f in dataclasses.fields(marker):  # series, index, owner, ... as attributes, for readers
            setattr(self, f.name, getattr(marker, f.name))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.ascend_compile.shared_weight(w, *self.args)

    def extra_repr(self) -> str:
        return f"series={self.series!r}, index={self.index}, owner={self.owner}"


def shard_model(model: nn.Module, config: SharedWeightConfig) -> ShardPlan:
    """Share the parameters of every series in ``config`` across the ranks of its group.

    Call after the weights are loaded, on every rank, with the same model and config.
    Guarantees: the model's outputs are unchanged (eagerly and under ``backend="ascend_compile"``;
    plain Inductor is refused at the first read, ``ForeignBackendError``); on each
    rank only the layers it owns keep storage; the plan is identical on every rank (checked).
    Shared parameters stop requiring grad: sharing is for inference.
    """
    if not isinstance(config, SharedWeightConfig):
        raise TypeError(f"config must be an ascend_compile.SharedWeightConfig, got {type(config).__name__}")
    pg = groups.resolve_group(config.group)
    gname = groups.group_name(pg)
    group_ranks = dist.get_process_group_ranks(pg)
    step = config.prefetch_step
    if config.layout == "slices" and step == "auto":
        step = 1  # the gathers of a prefill forward: one layer ahead
    step_value = AUTO_STEP if step == "auto" else step
    local: dict = {}

    def plan_here() -> dict:
        """This rank's plan; what can fail here may fail on one rank only (its model, its config)."""
        check_not_sharded(model)
        split = local["blocks"] = blocks.split(group_ranks, config.share_size, config.ranks_per_machine, gname)
        me = dist.get_rank()
        rank, world = split.rank_in_block(me), split.size
        per_layer = local["per_layer"] = series_members(model, config)
        for layer, members in per_layer.items():
            if step != "auto" and step > len(members) - 1:
                raise ConfigError(
                    f"prefetch_step={step} is out of range for series {layer!r}, which has {len(members)} "
                    f"layer(s): use 0..{len(members) - 1}"
                )
        if config.layout == "slices":
            for layer, members in per_layer.items():
                slice_layout.check_sliceable(layer, members, world)
        shared = []
        for layer, members in per_layer.items():
            for index, (mname, module, params) in enumerate(members):
                # whole shapes and bytes (a layer sliced at load holds 1/K of them)
                for pname, (p, shape, nbytes) in slice_layout.shared_params(module, params, world).items():
                    shared.append(SharedParam(
                        series=f"{layer}.{pname}", index=index, module=mname, param=pname,
                        owner=index % world if config.layout == "layers" else EVERY_RANK,
                        shape=shape, dtype=str(p.dtype).replace("torch.", ""), nbytes=nbytes,
                    ))
        local["plan"] = ShardPlan(gname, rank, world, step_value, {k: [m for m, _, _ in v] for k, v in per_layer.items()},
                                  shared, wrap_windows=config.wrap_windows(), layout=config.layout,
                                  block=split.index_of(me), blocks=len(split.members))
        return {"plan": {k: v for k, v in local["plan"].to_json().items() if k not in ("rank", "block")},
                "groups": groups.groups_known(), "machine": blocks.machine_name()}

    # every rank reports its plan or its error: one rank's odd model makes every rank raise, none waits
    gathered = failing.gather_or_fail(pg, "to plan the sharding", plan_here)
    errors.raise_if_different([g["plan"] for g in gathered], "sharding plan (model structure and config)")
    plan, per_layer, shared = local["plan"], local["per_layer"], local["plan"].params
    rank, split = plan.rank, local["blocks"]
    blocks.check_machines(split, [g["machine"] for g in gathered], group_ranks)
    # the broadcasts get a group of their own (one per block): its timeout bounds only them, and a rank
    # that stops inside a forward can close it so that its peers fail at once (failing.abort_group)
    ours = groups.sharing_group(pg, config.timeout, same_names=len({g["groups"] for g in gathered}) == 1,
                              blocks=split.members)
    if ours is pg:  # several shardings may share pg: windows are named by their group, so none cross forwards
        plan.wrap_windows = 0
    plan.group_name = gname = groups.group_name(ours)
    sharding = state.add(state.Sharding(gname, groups.group_name(pg), timeout=config.timeout))
    agree_at_shard_time(ours, plan, per_layer, sharding)
    setattr(model, state.ATTR, sharding)
    if plan.layout == "slices":
        _shard_slices(model, config, ours, plan, per_layer, sharding)
        setattr(model, PLAN_ATTR, plan)
        return plan

    modules = dict(model.named_modules())
    lengths = plan.series_lengths()
    for sp in shared:
        module = modules[sp.module]
        p = module._parameters[sp.param]
        if sp.owner == rank:
            p.requires_grad_(False)
        else:
            module._parameters[sp.param] = standin_like(p)  # drops this rank's reference to the real storage
        del p
        parametrize.register_parametrization(
            module, sp.param,
            SharedWeight(Marker(sp.series, sp.index, sp.owner, gname, step_value,
                                series_windows(plan.wrap_windows, lengths[sp.series]), lengths[sp.series],
                                plan.generation), sharding),
            unsafe=True
        )
    setattr(model, PLAN_ATTR, plan)
    return plan


def _shard_slices(model: nn.Module, config: SharedWeightConfig, pg, plan: ShardPlan, per_layer: dict,
                  sharding: "state.Sharding") -> None:
    """Keep this rank's slice of every layer, and settle the decode threshold (measured for "auto":
    every rank runs the same timed collectives, then the slowest rank's times decide everywhere)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = slices.slice_modules(per_layer, order, plan.rank, plan.world_size, plan.group_name, plan.generation)
    threshold = config.decode_tokens
    if threshold == "auto":
        try:
            costs = slice_measure.measure_paths(pg, layers, plan.prefetch_step)
        except Exception as e:  # its peers are in the timed collectives: close the group so they fail too
            failing.abort_group(plan.group_name, e)
            raise
        gathered = failing.gather_or_fail(pg, "to agree on the sliced paths' costs", lambda: costs)
        if costs is None:  # the same on every rank (the plans are equal): nothing that gathers
            threshold, plan.decode_explanation = 0, ("every sliced layer computes on its slices at every token count "
                                                     "(its own GEMM, e.g. quantized): no threshold to measure")
        else:
            threshold, plan.decode_explanation = slice_measure.choose_threshold(slice_measure.agree_costs(gathered))
    plan.decode_tokens, plan.paths = threshold, config.paths
    sliced = sharding.slices = slice_state.SliceState(plan.group_name, plan.generation, [sl for sl, _ in layers],
                                                 [m for _, m in layers], plan.prefetch_step, threshold,
                                                 by_shape=config.paths == "by_shape")
    for _, module in layers:
        setattr(module, state.ATTR, sharding)

    def start_forward(module, args):  # an eager forward of the model starts (a compiled one: at its graph's entry)
        if not torch.compiler.is_compiling():
            sliced.start_forward()

    model.register_forward_pre_hook(start_forward)


def check_not_sharded(model: nn.Module) -> None:
    if hasattr(model, PLAN_ATTR):
        raise ShardingError(
            f"{type(model).__name__} is already sharded (series {sorted(getattr(model, PLAN_ATTR).layer_series)}). "
            "Call shard_model once, with every series in one SharedWeightConfig."
        )
    for name, m in model.named_modules():
        if hasattr(m, "_ascend_compile_slice"):
            raise ShardingError(f"{name} is already sliced; shard a model once")
        if parametrize.is_parametrized(m) and any(
            isinstance(p, SharedWeight) for plist in m.parametrizations.values() for p in plist
        ):
            raise ShardingError(f"{name or type(model).__name__} already has shared weights; shard a model once")


def agree_at_shard_time(pg, plan: ShardPlan, per_layer: dict, sharding: "state.Sharding") -> dict:
    """Settle, while every rank is here, what compiled graphs need the ranks to agree on later:
    the link and matmul measurements of ``prefetch_step="auto"`` (slowest rank wins; taken only
    when the config asks for "auto"), the owners' storage formats, and the sharding generation
    that names this model's entries in the store's order check. One collective exchange (plus
    the link measurement's broadcasts); nothing later needs one."""
    from . import measure

    auto = plan.prefetch_step == AUTO_STEP  # measuring costs a layer-sized buffer or two: only for "auto"
    try:
        costs_here = _measure(pg, per_layer) if auto else None  # its collectives: every rank reaches them
    except Exception as e:
        if errors.is_comm_failure(e):  # a peer failed in it and closed the group: name it
            raise failing.peer_error("the link measurement of prefetch_step='auto'", plan.group_name, e) from e
        # this rank fails alone (out of memory for the measurement buffer, ...): its peers are in the
        # measurement's collectives or the exchange below; close the group so they fail at once
        failing.abort_group(plan.group_name, e)
        raise

    def mine() -> dict:
        by_module = {m: module for members in per_layer.values() for m, module, _ in members}
        owned_formats = {}
        for sp in plan.params:
            if sp.owner in (plan.rank, EVERY_RANK):
                fmt = formats.storage_format(getattr(by_module[sp.module], sp.param))
                if formats.special(fmt):
                    owned_formats[layer_name(sp.series, sp.index)] = fmt
        return {"generation": state.proposed_generation(plan.group_name), "costs": costs_here,
                "formats": owned_formats, "token": state.new_token()}

    gathered = failing.gather_or_fail(pg, "to read its shared weights' storage formats", mine)
    generation = max(g["generation"] for g in gathered)
    costs = measure.agree([g["costs"] for g in gathered]) if auto else None
    table = {k: v for g in gathered for k, v in g["formats"].items()}
    for layer, fmt in sorted(table.items()):  # the same table on every rank: every rank raises
        formats.check_reproducible(layer, fmt)
        if plan.layout == "slices":
            raise ConfigError(f"{layer} is stored in {formats.name(fmt)}, whose tiles cannot be cut into slices: "
                              "use SharedWeightConfig(layout='layers') for its series")
    plan.formats = table
    sharding.generation, sharding.token, sharding.costs, sharding.formats = generation, gathered[0]["token"], costs, table
    sharding.windows.series = {s: (n, series_windows(plan.wrap_windows, n)) for s, n in plan.series_lengths().items()}
    plan.generation = generation
    return costs


def _measure(pg, per_layer: dict) -> dict:
    """This rank's ``"auto"`` measurements: broadcasts of one decoder layer's bytes (all series)
    and a matmul shaped like the largest shared weight, on the weights' device."""
    from . import measure

    params = [p for members in per_layer.values() for _, _, ps in members for p in ps.values()]
    layer_bytes = sum(
        max(sum(p.numel() * p.element_size() for p in ps.values()) for _, _, ps in members)
        for members in per_layer.values()
    )
    weights = [p for p in params if p.dim() >= 2]
    ref = max(weights, key=lambda p: p.numel()) if weights else params[0]
    device = ref.device if ref.device.type != "meta" else torch.device("cpu")
    return measure.measure_at_shard(pg, layer_bytes, tuple(ref.shape), ref.dtype, device)


def invalidate_prefetch(model_or_group=None) -> list:
    """Drop the windows prefetched for the next forward (wrap-around) after the weights changed:
    a reload, an RL weight update, ``sleep``/``wake_up`` that discarded them. The next forward
    fetches its first layers again. Call on every rank of the sharing group at the same point
    (after the change, before the next forward): a rank that invalidated waits for its peers to
    do the same before its next broadcast, and raises ``RankMismatchError`` naming the ranks that
    did not. ``model_or_group``: a sharded model (its windows only), or a process group or its name
    (the windows of every model sharded over it); ``None`` = the default group. Returns the layers
    whose windows were dropped."""
    return sorted(layer for name in _sharding_groups(model_or_group, "invalidate") for layer in windows.invalidate(name))


def _sharding_groups(model_or_group, what: str) -> list:
    """The names of our groups that ``model_or_group`` (a sharded model, a process group or its name,
    None = the default group) covers."""
    if isinstance(model_or_group, nn.Module):
        plan = get_plan(model_or_group)
        if plan is None:
            raise ShardingError(f"{type(model_or_group).__name__} is not sharded: there is nothing to {what}")
        return [plan.group_name]
    user = model_or_group if isinstance(model_or_group, str) else groups.group_name(groups.resolve_group(model_or_group))
    names = sorted({s.group_name for s in state.over(user)})
    if not names:
        state.get(user)  # raises: nothing was sharded over it
    return names


def drain_prefetch(model_or_group=None) -> list:
    """Wait for the broadcasts that the last forward left in flight for the next one (wrap-around
    windows), and keep their windows: the next forward uses them as usual. Call it before the
    process stops (torch warns about collectives never waited for), before timing something else,
    or before tearing the process group down. It issues no collective and changes nothing the
    ranks must agree on: a rank may call it alone. A broadcast that cannot complete (a peer died)
    raises ``PeerError``. ``model_or_group`` as in ``invalidate_prefetch``. Returns the layers
    whose windows were waited for."""
    return sorted(layer for name in _sharding_groups(model_or_group, "drain") for layer in windows.complete(name))


def get_plan(model: nn.Module) -> Optional[ShardPlan]:
    return getattr(model, PLAN_ATTR, None)


def parameter_storage_bytes(model: nn.Module) -> int:
    """Bytes of unique storage behind the model's parameters and buffers (stand-ins count ~0)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes(), t.device)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


__all__ = [
    "SharedParam", "ShardPlan", "SharedWeight", "shard_model", "get_plan", "drain_prefetch", "invalidate_prefetch", "parameter_storage_bytes",
]
