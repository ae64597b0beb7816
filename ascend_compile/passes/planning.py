"""The plan of one compiled graph, from its markers and the options: the sharding it reads, the
series it prefetches across forwards, the step (``"auto"`` resolved by the cost model, with no
communication), and the collective schedule the passes will give it."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from torch import fx

from ..config import CompileOptions, ConfigError
from ..runtime import groups, state
from ..runtime.marker import series_windows
from .graph import is_marker, marker_args
from .plan import CompilePlan, marker_groups, markers_by_series
from .prefetch import collective_order, collective_schedule, schedule_prefetch
from .shared_weight import rewrite_shared_weights

log = logging.getLogger(__name__)


def make_plan(gm: fx.GraphModule, options: CompileOptions) -> Optional[CompilePlan]:
    names = marker_groups(gm.graph)
    if not names:
        return None
    if len(names) > 1:
        raise ConfigError(
            f"one compiled graph shares weights over several process groups {sorted(names)}; "
            "share every series over one group (SharedWeightConfig(group=...) once for all layers)"
        )
    (name,) = names
    step = options.prefetch_step
    if isinstance(step, int):
        check_step_in_range(gm.graph, step)
    pg = groups.group_from_name(name)
    generations = {marker_args(n).generation for n in gm.graph.nodes if is_marker(n)}
    if len(generations) > 1:
        raise ConfigError(f"one compiled graph reads the shared weights of several sharded models (shardings "
                          f"{sorted(generations)} of group {name!r}); compile each model on its own")
    (generation,) = generations
    return CompilePlan(
        rank=groups.group_rank(pg), world_size=groups.group_size(pg), group_name=name,
        prefetch_step=None if step == "auto" else step, pin_order=options.pin_order,
        formats=tuple(sorted(state.get(name, generation).formats.items())),
        wrap=wrap_around_series(gm.graph), generation=generation,
    )


def plan_graph(gm: fx.GraphModule, options: CompileOptions, *, wraps: bool, refuse_wrap: str, inplace: bool,
               pins_order: bool = True) -> tuple:
    """``(plan, explanation)`` for a graph whose markers the passes will rewrite (``make_plan``), as the
    lowering that runs it can take it: a graph prefetching across forwards where the lowering cannot
    (``wraps`` False) raises ``ConfigError(refuse_wrap)`` (``{series}``: the wrapped series); the order is
    pinned only if the lowering keeps pins (``pins_order``); ``inplace``: broadcast into fresh buffers
    (``broadcast_``) rather than the functional collective; ``"auto"`` resolved (``resolve_auto_step``).
    Our backend calls it per graph, vLLM's pass per piece."""
    plan = make_plan(gm, options)
    if plan.wrap and not wraps:
        raise ConfigError(refuse_wrap.format(series=[s for s, _ in plan.wrap]))
    plan = dataclasses.replace(plan, pin_order=plan.pin_order and pins_order, inplace=inplace)
    return resolve_auto_step(gm, plan, options)


def wrap_around_series(graph: fx.Graph) -> tuple:
    """``(("series", w), ...)``: the series this graph prefetches across steps, from the markers
    (each model carries its own ``wrap_windows`` and series length). Only a graph that holds every
    layer of a series (the whole forward of it) can hand its first layers to the next forward; a
    graph holding part of a wrapped series is refused (``ConfigError``)."""
    out = []
    for series, markers in markers_by_series(graph).items():
        settings = {(a.wrap_windows, a.layers) for a in markers}
        if len(settings) != 1:
            raise ConfigError(f"series {series!r} mixes wrap-around settings {sorted(settings)} in one graph: "
                              "shard each model once, with one SharedWeightConfig")
        ((w, n),) = settings
        if w <= 0 or n < 2:
            continue
        held = {a.index for a in markers}
        if held != set(range(n)):
            # its eager forwards and its other graphs take the first layers from windows that only a
            # graph holding the whole series sends and consumes: the ranks' collectives would differ
            raise ConfigError(
                f"this graph holds {len(held)} of the {n} layers of series {series!r} (a graph break?), and "
                "wrap-around prefetch needs all of them in one graph: remove the graph break "
                "(torch.compile(..., fullgraph=True) shows where), or shard with SharedWeightConfig(wrap_around=False)."
            )
        out.append((series, series_windows(w, n)))
    return tuple(out)


def check_step_in_range(graph: fx.Graph, step: int) -> None:
    """``options["prefetch_step"]`` must leave every series of the graph something to fetch ahead of."""
    for series, markers in markers_by_series(graph).items():
        indices = {a.index for a in markers}
        if step > len(indices) - 1:
            raise ConfigError(
                f"options['prefetch_step']={step} is out of range for series {series!r}, which has "
                f"{len(indices)} layer(s) in this graph: use 0..{len(indices) - 1}, or 'auto'"
            )


def resolve_auto_step(gm: fx.GraphModule, plan: CompilePlan, options: CompileOptions) -> tuple:
    """``(plan with a fixed step, explanation)``: runs the cost model when the step is "auto".

    No communication: the link and matmul rate were agreed when the model was sharded. Ranks
    compiling different shapes may choose different steps, so a step is only taken when it
    keeps the collective order of fetching each layer at its use (``k = 0``), a function of the
    model alone: every graph of the model, on every rank, issues the same broadcasts in the
    same order whatever step each chose (with wrap-around too: windows first, the next forward's
    windows after every other broadcast).
    """
    from . import autotune

    if options.prefetch_step != "auto" and (plan.prefetch_step is not None or not autotune.wants_auto(gm)):
        return plan, None
    agreed = state.get(plan.group_name, plan.generation).costs
    if agreed is None:  # sharded with a fixed step: nothing was measured
        missing = [k for k in ("bandwidth", "latency_s", "compute_s") if k not in options.cost_model]
        if missing:
            raise ConfigError(
                "options['prefetch_step']='auto' on a model sharded with a fixed prefetch_step: the link is measured "
                "when sharding, and only for SharedWeightConfig(prefetch_step='auto'). Shard with prefetch_step='auto', "
                f"or give options['cost_model'] the missing {missing}"
            )
        agreed = {}
    canonical = collective_order(planned_schedule(gm, dataclasses.replace(plan, prefetch_step=0)))

    def same_order(k: int) -> bool:
        return collective_order(planned_schedule(gm, dataclasses.replace(plan, prefetch_step=k))) == canonical

    choice = autotune.choose(gm, agreed, options.cost_model, allowed=same_order,
                             wrap_windows=max(dict(plan.wrap).values(), default=0))
    log.info("ascend_compile: prefetch_step=auto chose %s", choice.explanation)
    return dataclasses.replace(plan, prefetch_step=choice.k), choice.explanation


def planned_schedule(gm: fx.GraphModule, plan: CompilePlan) -> list:
    """The collective order our passes give this graph, computed on a copy (weights shared, not copied)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    copy = schedule_prefetch(rewrite_shared_weights(copy, plan), plan)
    return collective_schedule(copy.graph)
