"""The Dynamo backend ``ascend_compile``: options -> plan -> pass pipeline -> lowering.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="ascend_compile", options={...})`` works after
``pip install`` with no import. A graph without shared weights goes to the lowering
unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import fx

from .config import CompileOptions, ConfigError
from .debug.dump import GraphDumper, compile_id, schedule_table
from .lowering import get_lowering
from .passes import PassPipeline, default_passes
from .passes.graph import sliced_layers, sliced_token_counts
from .passes.plan import marker_groups
from .passes.planning import plan_graph, planned_schedule
from .passes.prefetch import collective_order, order_layers
from .runtime import failing, groups, order, state
from .runtime.guard import GuardedGraph
from .runtime.marker import layer_name

log = logging.getLogger(__name__)


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


def check_sliced(gm: fx.GraphModule, opts: CompileOptions, mode: Optional[str]) -> list:
    """Graphs with sliced layers (``layout="slices"``) run on the Inductor, aot_eager and eager
    lowerings. They are captured (CUDA/ACL graphs: ``mode="reduce-overhead"``, torchair's
    ``reduce-overhead``) only with ``paths="by_shape"``: with ``"agreed"`` each forward agrees on its
    path in Python at run time (a host sync), which a graph replay would skip. torchair's GE graph
    mode has no converter for ``sliced_linear`` (``check_converters`` names it)."""
    layers = sliced_layers(gm.graph)
    if not layers:
        return layers
    agreed = sorted({f"{series}[{index}]" for series, index, group, generation in layers
                     if not state.get(group, generation).slices.by_shape})
    capturing = mode in ("reduce-overhead", "max-autotune") or bool(opts.inductor.get("triton.cudagraphs"))
    if opts.lowering == "torchair":
        capturing = opts.torchair.get("mode", _torchair_default_mode()) == "reduce-overhead"
        if not capturing:
            raise ConfigError(f"this graph computes {len(layers)} sliced layer(s) (layout='slices'), and torchair's GE "
                              "graph mode (max-autotune) has no converter for ascend_compile::sliced_linear: compile "
                              "with options={'torchair': {'mode': 'reduce-overhead'}} (ACL graph capture) and shard "
                              "with SharedWeightConfig(paths='by_shape'), or use layout='layers'")
    if agreed and capturing:
        where = ("the torchair lowering (ACL graph capture)" if opts.lowering == "torchair"
                 else "CUDA-graph capture")
        raise ConfigError(f"this graph computes {len(layers)} sliced layer(s) (layout='slices'), and {agreed[:4]} "
                          f"agree on their path in Python at every forward (paths='agreed'), which {where} would "
                          "replay from the first forward: shard with SharedWeightConfig(paths='by_shape') (every rank "
                          "runs the same token count, as vLLM pads under graph capture), or compile with "
                          "mode='max-autotune-no-cudagraphs' or no mode on the Inductor lowering")
    return layers


def _torchair_default_mode() -> str:
    from .lowering.torchair import DEFAULT_MODE

    return DEFAULT_MODE


def ascend_compile_backend(gm: fx.GraphModule, example_inputs: list, options: Any = None, mode: Optional[str] = None):
    if options is None:  # inside vLLM: additional_config["ascend_compile"]["compile"] and debug_dump_path
        from .integrations.vllm import compile_options

        options = compile_options()
    opts = CompileOptions.from_dict(options)
    check_mode(opts.lowering, mode)
    sliced = check_sliced(gm, opts, mode)
    groups = marker_groups(gm.graph)
    if sliced and not groups:
        return _compile_sliced(gm, example_inputs, opts, mode, sliced)
    if not groups:
        log.debug("ascend_compile: no shared weights in this graph; lowering %s unchanged", opts.lowering)
        compiled = _lower(get_lowering(opts.lowering), gm, example_inputs, None, opts, mode)
        if not state.any_sharding():
            return compiled
        from .runtime.guard import OpaqueReadGuard

        # a sharded model's layers may be read inside the graph's opaque ops: refused unless fetch_layers
        return OpaqueReadGuard(compiled, compile_id())
    try:
        return _compile_shared(gm, example_inputs, opts, mode)
    except BaseException as e:
        import torch._dynamo

        if not torch._dynamo.config.suppress_errors:
            # This rank's forward stops here while its peers' compiled graphs broadcast: abort the
            # group so they fail at once naming this rank. (With suppress_errors, Dynamo runs this
            # forward eagerly instead, and the eager markers issue the same collectives.)
            for name in sorted(groups):
                failing.abort_group(name, e)
        raise


def _compile_sliced(gm: fx.GraphModule, example_inputs: list, opts: CompileOptions, mode: Optional[str],
                    sliced: list):
    """A graph of sliced layers only: lowered unchanged (each ``sliced_linear`` call issues its own
    collectives, in the order the ordered effect keeps), its table dumped, its order of sliced layers
    checked against the other ranks' (``SlicedOrderGuard``)."""
    from .debug.dump import slices_table
    from .runtime.guard import SlicedOrderGuard

    dumper = GraphDumper(opts.dump_dir, groups.global_rank())
    dumper.schedule(slices_table(sliced, groups.global_rank(), sliced_token_counts(gm.graph)))
    compiled = _lower(get_lowering(opts.lowering), gm, example_inputs, None, opts, mode)
    return SlicedOrderGuard(compiled, layers=sliced, graph_id=dumper.graph_id, check=opts.check_ranks)


def _compile_shared(gm: fx.GraphModule, example_inputs: list, opts: CompileOptions, mode: Optional[str]):
    import time

    start = time.monotonic()
    lowering = get_lowering(opts.lowering)
    plan, explanation = plan_graph(
        gm, opts, wraps=getattr(lowering, "WRAP_AROUND", False), pins_order=lowering.PINS_ORDER,
        inplace=lowering.INPLACE_BROADCAST,
        refuse_wrap=f"the {opts.lowering} lowering has no wrap-around prefetch (a graph run cannot leave a broadcast "
                    "in flight), but series {series} were sharded with it: shard with "
                    "SharedWeightConfig(wrap_around=False) (the default where torch_npu is importable)")
    # Directories by global rank: with several sharing groups (one per data-parallel replica,
    # say) group ranks repeat across processes and would overwrite each other's dumps.
    global_rank = groups.global_rank()
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
    fetches = collective_order(planned)
    sharding = state.get(plan.group_name, plan.generation)
    key = order.order_key(plan.group_name, sharding.generation, order_layers(fetches), plan.wrap, sharding.token)
    table["order"] = [str(c) for c in fetches]
    table["order_key"] = key  # graphs under one key must have equal orders (``ascend-compile explain`` checks)
    dumper.schedule(table)
    seconds = time.monotonic() - start
    if sharding.timeout is not None and seconds > 0.5 * sharding.timeout:
        log.warning("ascend_compile: compiled graph %s took %.1f s to compile, more than half of "
                    "SharedWeightConfig(timeout=%s): when this rank recompiles at a call where its peers do not, they "
                    "wait that long in a broadcast and may give up (PeerError). Set the timeout well above the longest "
                    "compile.", dumper.graph_id, seconds, sharding.timeout)
    return GuardedGraph(
        compiled, order=fetches, key=key,
        plan=plan, graph_id=dumper.graph_id, waits=pipeline.layer_nodes, timeout=sharding.timeout,
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
