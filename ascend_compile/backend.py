"""The Dynamo backend ``ascend_compile``: options -> plan -> pass pipeline -> lowering.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="ascend_compile", options={...})`` works after
``pip install`` with no import. A graph without shared weights goes to the lowering
unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from torch import fx

from .config import CompileOptions, ConfigError
from .debug.dump import GraphDumper
from .lowering import get_lowering
from .passes import CompilePlan, PassPipeline, collective_schedule, default_passes, rewrite_shared_weights, schedule_prefetch
from .passes.graph import is_marker, marker_args
from .passes.plan import marker_groups
from .runtime import comm

log = logging.getLogger(__name__)


def make_plan(gm: fx.GraphModule, options: CompileOptions) -> Optional[CompilePlan]:
    groups = marker_groups(gm.graph)
    if not groups:
        return None
    if len(groups) > 1:
        raise ConfigError(
            f"one compiled graph shares weights over several process groups {sorted(groups)}; "
            "share every series over one group (SharedWeightConfig(group=...) once for all layers)"
        )
    (name,) = groups
    step = options.prefetch_step
    if isinstance(step, int):
        check_step_in_range(gm.graph, step)
    pg = comm.group_from_name(name)
    return CompilePlan(
        rank=comm.group_rank(pg), world_size=comm.group_size(pg), group_name=name,
        prefetch_step=None if step == "auto" else step, pin_order=options.pin_order,
    )


def check_step_in_range(graph: fx.Graph, step: int) -> None:
    """``options["prefetch_step"]`` must leave every series of the graph something to fetch ahead of."""
    layers: dict = {}
    for n in graph.nodes:
        if is_marker(n):
            a = marker_args(n)
            layers.setdefault(a.series, set()).add(a.index)
    for series, indices in sorted(layers.items()):
        if step > len(indices) - 1:
            raise ConfigError(
                f"options['prefetch_step']={step} is out of range for series {series!r}, which has "
                f"{len(indices)} layer(s) in this graph: use 0..{len(indices) - 1}, or 'auto'"
            )


def resolve_auto_step(gm: fx.GraphModule, plan: CompilePlan, options: CompileOptions) -> tuple:
    """``(plan with a fixed step, explanation)``: runs the cost model when the step is "auto"."""
    from .runtime import autotune

    if options.prefetch_step != "auto" and (plan.prefetch_step is not None or not autotune.wants_auto(gm)):
        return plan, None
    choice = autotune.choose(gm, comm.group_from_name(plan.group_name), options.cost_model)
    log.info("ascend_compile: prefetch_step=auto chose %s", choice.explanation)
    return dataclasses.replace(plan, prefetch_step=choice.k), choice.explanation


def planned_schedule(gm: fx.GraphModule, plan: CompilePlan) -> list:
    """The collective order our passes give this graph, computed on a copy (weights shared, not copied)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    copy = schedule_prefetch(rewrite_shared_weights(copy, plan), plan)
    return collective_schedule(copy.graph)


def schedule_fingerprint(schedule: list, plan: CompilePlan) -> dict:
    """What must be identical on every rank: the collectives in issue order and the step."""
    return {
        "world_size": plan.world_size,
        "group": plan.group_name,
        "collectives": [
            f"{r['series']}[{r['index']}] owner={r['owner']} bytes={r['bytes']} step={r['prefetch_step']}"
            for r in schedule
        ],
    }


class RankCheckedGraph:
    """A compiled graph that, at its first call, checks every rank compiled the same schedule."""

    def __init__(self, compiled, fingerprint: dict, group_name: str, graph_id: str):
        self.compiled = compiled
        self.fingerprint = fingerprint
        self.group_name = group_name
        self.graph_id = graph_id
        self.checked = False

    def __call__(self, *args):
        if not self.checked:
            comm.check_same_across_ranks(
                self.fingerprint, comm.group_from_name(self.group_name),
                f"collective schedule of compiled graph {self.graph_id}",
            )
            self.checked = True
        return self.compiled(*args)


def schedule_table(plan: CompilePlan, rows: list) -> dict:
    steps = sorted({r["prefetch_step"] for r in rows})
    return {
        "rank": plan.rank, "world_size": plan.world_size, "group": plan.group_name,
        "prefetch_step": steps[0] if len(steps) == 1 else steps,
        "collectives": [{k: r[k] for k in ("series", "index", "owner", "bytes", "issue", "wait", "first_use", "last_use")} for r in rows],
    }


def ascend_compile_backend(gm: fx.GraphModule, example_inputs: list, options: Any = None, mode: Optional[str] = None):
    if options is None:  # inside vLLM: additional_config["ascend_compile"]["compile"] and debug_dump_path
        from .integrations.vllm import compile_options

        options = compile_options()
    opts = CompileOptions.from_dict(options)
    lowering = get_lowering(opts.lowering)
    plan = make_plan(gm, opts)
    if plan is None:
        log.debug("ascend_compile: no shared weights in this graph; lowering %s unchanged", opts.lowering)
        return _lower(lowering, gm, example_inputs, None, opts, mode)

    plan = dataclasses.replace(plan, pin_order=opts.pin_order and lowering.PINS_ORDER,
                               inplace=lowering.INPLACE_BROADCAST)
    plan, explanation = resolve_auto_step(gm, plan, opts)
    # Directories by global rank: with several sharing groups (one per data-parallel replica,
    # say) group ranks repeat across processes and would overwrite each other's dumps.
    global_rank = comm.global_rank()
    dumper = GraphDumper(opts.dump_dir, global_rank)
    planned = planned_schedule(gm, plan)
    pipeline = PassPipeline(plan, default_passes(plan.pin_order, getattr(lowering, "STREAMS", False)),
                            observer=dumper.graph)
    compiled = _lower(lowering, gm, example_inputs, pipeline, opts, mode)
    # The table holds positions in the last graph we controlled; on an Inductor cache hit the
    # passes did not run, so fall back to the positions in our own copy of Dynamo's graph.
    table = schedule_table(plan, pipeline.final_schedule or planned)
    if explanation:
        table["explain"] = explanation
    table["global_rank"] = global_rank
    table["pass_seconds"] = dict(pipeline.seconds)
    if pipeline.ordering_report is not None:
        table["ordering_edges"] = pipeline.ordering_report
    dumper.schedule(table)
    if not opts.check_ranks:
        return compiled
    return RankCheckedGraph(compiled, schedule_fingerprint(planned, plan), plan.group_name, dumper.graph_id)


def _lower(lowering, gm, example_inputs, pipeline, opts, mode):
    if mode is not None and lowering.__name__.endswith(".inductor"):
        return lowering.compile(gm, example_inputs, pipeline, opts, mode=mode)
    return lowering.compile(gm, example_inputs, pipeline, opts)
