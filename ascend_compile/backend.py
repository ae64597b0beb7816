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
from .passes.plan import marker_groups, markers_by_series
from .passes.prefetch import collective_order
from .runtime import comm
from .runtime.ops import layer_name

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
    generations = {marker_args(n).generation for n in gm.graph.nodes if is_marker(n)}
    if len(generations) > 1:
        raise ConfigError(f"one compiled graph reads the shared weights of several sharded models (shardings "
                          f"{sorted(generations)} of group {name!r}); compile each model on its own")
    (generation,) = generations
    return CompilePlan(
        rank=comm.group_rank(pg), world_size=comm.group_size(pg), group_name=name,
        prefetch_step=None if step == "auto" else step, pin_order=options.pin_order,
        formats=tuple(sorted(comm.shard_formats(name, generation).items())),
        wrap=wrap_around_series(gm.graph), generation=generation,
    )


def wrap_around_series(graph: fx.Graph) -> tuple:
    """``(("series", w), ...)``: the series this graph prefetches across steps, from the markers
    (each model carries its own ``wrap_windows`` and series length). Only a graph that holds every
    layer of a series (the whole forward of it) can hand its first layers to the next forward; a
    series split over several graphs (graph breaks, piecewise) fetches within each."""
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
                f"this graph holds {len(held)} of the {n} layers of series {series!r} (a graph break inside the "
                "model?), but the model was sharded with wrap-around prefetch, which needs every layer of a series "
                "in one graph. Remove the graph break (torch.compile(..., fullgraph=True) shows where it is), or "
                "shard with SharedWeightConfig(wrap_around=False)."
            )
        out.append((series, min(w, n - 1)))
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
    from .runtime import autotune

    if options.prefetch_step != "auto" and (plan.prefetch_step is not None or not autotune.wants_auto(gm)):
        return plan, None
    agreed = comm.shard_state(plan.group_name, plan.generation)["costs"]
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


class GuardedGraph:
    """A compiled graph with shared weights, checked against the other ranks without a collective.

    - Its collective order is published to the process group's store at compile time and
      compared with every peer's order for the same layers, at compile time and at calls 1, 2,
      4, 8, ... until every peer has published (a non-blocking store lookup): a difference
      raises ``RankMismatchError`` before this graph issues a broadcast.
    - Its broadcasts wait for peers that are still compiling (ranks compile at different calls):
      ``SharedWeightConfig(timeout)`` must exceed the longest compile; ``_compile_shared`` warns
      when a compile took more than half of it. (Waiting on the store for a peer's compile
      instead cannot tell a slow peer from one that runs the forward eagerly, or died.)
    - A broadcast that fails (a peer died, or timed out because it stopped issuing the same
      collectives) raises ``PeerError`` naming the graph, the group and the layer; any error
      aborts the group (``comm.abort_group``) so that the peers fail at once, naming this rank.
    """

    def __init__(self, compiled, *, order: list, key: str, plan: CompilePlan, graph_id: str,
                 waits: dict, waits_in_order: list, timeout=None, check: bool = True):
        self.compiled = compiled
        self.order, self.key, self.plan = order, key, plan
        self.graph_id = graph_id
        self.waits = waits  # names of the nodes that wait for / issue a layer -> "series[index]"
        self.waits_in_order = waits_in_order  # "series[index]" of each wait, in graph order
        self.timeout = timeout
        self.verified = not check
        self.calls = 0
        self.error = None
        if check:  # raised at the call (Dynamo would wrap it into BackendCompilerFailed here)
            try:
                comm.publish_order(key, plan.rank, order)
            except comm.RankMismatchError as e:
                self.error = e

    def _verify(self) -> None:
        if self.error is not None:
            raise self.error
        self.verified = comm.check_published(
            self.key, self.plan.rank, self.plan.world_size, self.order,
            f"compiled graph {self.graph_id} (shared layers {self.order[0].split(' ')[0]}..{self.order[-1].split(' ')[0]})",
        )

    def __call__(self, *args):
        try:
            if not self.verified:
                self.calls += 1
                if self.calls & (self.calls - 1) == 0:  # calls 1, 2, 4, 8, ...: a peer that never
                    self._verify()                      # publishes (another layer set) costs little
            try:
                return self.compiled(*args)
            except Exception as e:
                layer = getattr(e, "layer", None)  # a window op's PeerError names its layer
                if layer is not None and isinstance(e, comm.PeerError):
                    raise comm.PeerError(self.describe_failure(e.__cause__ or e, layer)) from e
                if isinstance(e, comm.PeerError) or not comm.is_comm_failure(e):
                    raise
                raise comm.PeerError(self.describe_failure(e)) from e
        except BaseException as e:
            # This rank leaves its forward half-way (or never starts it): its peers are, or will be,
            # waiting in a broadcast it does not join. Abort the group so they fail at once, naming it.
            comm.abort_group(self.plan.group_name, e)
            raise

    def describe_failure(self, e: BaseException, layer: Optional[str] = None) -> str:
        layer = layer or failed_layer(e, self.waits, self.waits_in_order)
        where = f"the broadcast of {layer}" if layer else f"one of its {len(self.order)} broadcasts"
        bound = (f"SharedWeightConfig(timeout={self.timeout})" if self.timeout is not None
                 else "the process group's own timeout (set SharedWeightConfig(timeout=...) to bound it)")
        cause = comm.peer_cause(self.plan.group_name, " (it skipped a forward, ran a different model path, or was "
                                                      "still compiling when the timeout ran out)")
        return (
            f"compiled graph {self.graph_id} failed in {where} over process group {self.plan.group_name!r} "
            f"(rank {self.plan.rank} of {self.plan.world_size}): {comm.first_line(e)}. {cause}; the wait was bounded by "
            f"{bound}. The group is unusable after this: restart every rank."
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


def schedule_table(plan: CompilePlan, rows: list) -> dict:
    steps = sorted({r["prefetch_step"] for r in rows})
    return {
        "rank": plan.rank, "world_size": plan.world_size, "group": plan.group_name,
        "prefetch_step": steps[0] if len(steps) == 1 else steps,
        "collectives": [{k: r[k] for k in ("series", "index", "owner", "bytes", "issue", "wait", "first_use", "last_use", "kind")}
                        for r in rows],
    }


def check_mode(lowering: str, mode: Optional[str]) -> None:
    """``torch.compile(mode=...)`` reaches a backend as ``mode``: Inductor's presets
    (``torch._inductor.list_mode_options``). Only the Inductor lowering uses them; under any other
    the mode would be dropped without a word, so it is refused, naming the knob that lowering reads."""
    if mode is None or lowering == "inductor":
        return
    if lowering == "torchair":
        fix = ("torchair's graph modes are set through the options: torch.compile(model, backend=\"ascend_compile\", "
               "options={\"torchair\": {\"mode\": \"reduce-overhead\"}}) (or \"max-autotune\", the default)")
    else:
        fix = f"drop mode= (the {lowering} lowering has no presets), or lower with options={{\"lowering\": \"inductor\"}}"
    raise ConfigError(f"torch.compile(mode={mode!r}) selects Inductor presets, but this graph is lowered with "
                      f"{lowering!r}, which does not use them: {fix}")


def ascend_compile_backend(gm: fx.GraphModule, example_inputs: list, options: Any = None, mode: Optional[str] = None):
    if options is None:  # inside vLLM: additional_config["ascend_compile"]["compile"] and debug_dump_path
        from .integrations.vllm import compile_options

        options = compile_options()
    opts = CompileOptions.from_dict(options)
    check_mode(opts.lowering, mode)
    groups = marker_groups(gm.graph)
    if not groups:
        log.debug("ascend_compile: no shared weights in this graph; lowering %s unchanged", opts.lowering)
        return _lower(get_lowering(opts.lowering), gm, example_inputs, None, opts, mode)
    try:
        return _compile_shared(gm, example_inputs, opts, mode)
    except BaseException as e:
        import torch._dynamo

        if not torch._dynamo.config.suppress_errors:
            # This rank's forward stops here while its peers' compiled graphs broadcast: abort the
            # group so they fail at once naming this rank. (With suppress_errors, Dynamo runs this
            # forward eagerly instead, and the eager markers issue the same collectives.)
            for name in sorted(groups):
                comm.abort_group(name, e)
        raise


def _compile_shared(gm: fx.GraphModule, example_inputs: list, opts: CompileOptions, mode: Optional[str]):
    import time

    start = time.monotonic()
    lowering = get_lowering(opts.lowering)
    plan = make_plan(gm, opts)
    if plan.wrap and not getattr(lowering, "WRAP_AROUND", False):
        raise ConfigError(
            f"the {opts.lowering} lowering has no wrap-around prefetch (a graph run cannot leave a broadcast in flight "
            f"for the next one), but series {[s for s, _ in plan.wrap]} were sharded with it, and the model's eager "
            "forwards would follow it: shard with SharedWeightConfig(wrap_around=False) (the default where torch_npu "
            "is importable)"
        )
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
    table["order"] = order = collective_order(planned)
    dumper.schedule(table)
    state = comm.shard_state(plan.group_name, plan.generation)
    seconds = time.monotonic() - start
    if state.get("timeout") is not None and seconds > 0.5 * state["timeout"]:
        log.warning("ascend_compile: compiled graph %s took %.1f s to compile, more than half of "
                    "SharedWeightConfig(timeout=%s): when this rank recompiles at a call where its peers do not, they "
                    "wait that long in a broadcast and may give up (PeerError). Set the timeout well above the longest "
                    "compile.", dumper.graph_id, seconds, state["timeout"])
    return GuardedGraph(
        compiled, order=order, key=comm.order_key(plan.group_name, state["generation"], order, plan.wrap, state.get("token", "")),
        plan=plan, graph_id=dumper.graph_id, waits=pipeline.layer_nodes, timeout=state.get("timeout"),
        # the c10d waits only (Inductor's wrapper shows them as wait_tensor; window ops name their layer)
        waits_in_order=[layer_name(r["series"], r["index"]) for r in sorted(pipeline.final_schedule or planned,
                                                                             key=lambda r: r["wait"] or 0)
                        if r["kind"] == "fetch"],
        check=opts.check_ranks,
    )


def _lower(lowering, gm, example_inputs, pipeline, opts, mode):
    if mode is not None and lowering.__name__.endswith(".inductor"):
        return lowering.compile(gm, example_inputs, pipeline, opts, mode=mode)
    return lowering.compile(gm, example_inputs, pipeline, opts)
