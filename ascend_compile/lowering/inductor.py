"""Inductor: our passes run as a post-grad custom pass on the aten graph Inductor lowers.

The pass is registered through ``torch._inductor.config.post_grad_custom_post_pass`` as a
``CustomGraphPass`` whose ``uuid()`` covers the pass sources and the plan (rank, world
size, group, prefetch step), so the FX graph cache (shared by local ranks) never hands one
rank's graph to another. Inductor reorders freely; ``pin_order`` states our order in the
graph with ``control_deps``, and ``OrderingAudit`` (Inductor's pre-fusion hook) checks which of
those edges reached Inductor's scheduler: the report goes to ``schedule.json`` and a dropped
edge is logged as a warning. With ``dump_dir`` set, Inductor's caches are bypassed for graphs with
shared weights, so the per-pass dumps are always written.
"""

from __future__ import annotations

import logging

from torch._inductor.custom_graph_pass import CustomGraphPass

log = logging.getLogger(__name__)

INPLACE_BROADCAST = True  # broadcast_ into fresh buffers: no layer copies
WRAP_AROUND = True  # window ops (runtime/windows.py) run as opaque custom ops
PINS_ORDER = True


class SharedWeightInductorPass(CustomGraphPass):
    def __init__(self, pipeline, chained=None):
        self.pipeline = pipeline
        self.chained = chained  # a user's own post-grad pass, run first

    def __call__(self, graph):
        if self.chained is not None:
            self.chained(graph)
        self.pipeline(graph.owning_module)

    def uuid(self):
        chained = self.chained.uuid() if self.chained is not None and hasattr(self.chained, "uuid") else None
        return f"{self.pipeline.uuid()}-{chained}"


class OrderingAudit(CustomGraphPass):
    """Inductor's ``_pre_fusion_custom_pass``: which pinned ordering edges reached the scheduler.

    An edge ``(before, after)`` (FX node names, as ``pin_order`` recorded them) reached it when
    a scheduler node made from ``before`` is an ancestor of one made from ``after``. The
    scheduler nodes are returned unchanged.
    """

    def __init__(self, pipeline, chained=None):
        self.pipeline = pipeline
        self.chained = chained

    def __call__(self, nodes):
        if self.chained is not None:
            nodes = self.chained(nodes)
        edges = self.pipeline.ordering_edges
        if edges is not None:
            self.pipeline.ordering_report = edges_in_scheduler(edges, nodes)
            if self.pipeline.ordering_report["dropped"]:
                log.warning("ascend_compile: Inductor dropped ordering edge(s) %s; the collective order still holds "
                            "(Inductor orders collectives as listed), their overlap may not",
                            self.pipeline.ordering_report["dropped"])
        return nodes

    def uuid(self):
        chained = self.chained.uuid() if self.chained is not None and hasattr(self.chained, "uuid") else None
        return f"audit-{self.pipeline.uuid()}-{chained}"


def edges_in_scheduler(edges: list, snodes: list) -> dict:
    """``{"requested", "reached_scheduler", "dropped": [[before, after], ...]}`` for scheduler nodes ``snodes``."""
    made_from: dict = {}
    for snode in snodes:
        for sub in snode.get_nodes():
            for origin in getattr(sub.node, "origins", None) or ():
                made_from.setdefault(origin.name, []).append(snode)
    dropped = [
        [before, after] for before, after in edges
        if not any(b.get_name() in a.ancestors for a in made_from.get(after, ()) for b in made_from.get(before, ()))
    ]
    return {"requested": len(edges), "reached_scheduler": len(edges) - len(dropped), "dropped": dropped}


def config_patches(pipeline, options, mode=None) -> dict:
    import torch._inductor
    from torch._inductor import config

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(options.inductor)
    if pipeline is not None:
        user_pass = patches.get("post_grad_custom_post_pass", config.post_grad_custom_post_pass)
        patches["post_grad_custom_post_pass"] = SharedWeightInductorPass(pipeline, user_pass)
        if pipeline.plan.pin_order and hasattr(config, "_pre_fusion_custom_pass"):
            user_audit = patches.get("_pre_fusion_custom_pass", config._pre_fusion_custom_pass)
            patches["_pre_fusion_custom_pass"] = OrderingAudit(pipeline, user_audit)
    return patches


def check_capture(patches: dict, pipeline) -> None:
    """Refuse CUDA-graph capture (``mode="reduce-overhead"``/``"max-autotune"``, or
    ``options["inductor"]["triton.cudagraphs"]``) of a graph with wrap-around window ops: their
    bookkeeping (which window is in flight, the next forward's broadcast) is Python that runs
    once, at capture; every replay would reuse the captured buffers and skip it, and the ranks'
    collectives would pair with the wrong layers. Graphs without window ops hold only c10d
    functional collectives, which the capture records like any other kernel."""
    from ..config import ConfigError

    if pipeline is None or not pipeline.plan.wrap or not patches.get("triton.cudagraphs"):
        return
    raise ConfigError(
        f"this graph prefetches series {[s for s, _ in pipeline.plan.wrap]} across forwards, which CUDA-graph "
        "capture (mode='reduce-overhead' or 'max-autotune', or triton.cudagraphs) would replay with stale windows: "
        "use mode='max-autotune-no-cudagraphs' or no mode, or shard with SharedWeightConfig(wrap_around=False)"
    )


def compile(gm, example_inputs, pipeline, options, mode=None):
    import contextlib

    import torch._functorch.config
    from torch._inductor.compile_fx import compile_fx

    patches = config_patches(pipeline, options, mode)
    check_capture(patches, pipeline)
    bypass = contextlib.nullcontext()
    if options.dump_dir and pipeline is not None:
        # A cache hit skips our passes, and with them the per-pass dumps: while dumping, compile
        # from scratch (FX graph cache and AOTAutograd cache off for this graph only).
        patches["fx_graph_cache"] = False
        bypass = torch._functorch.config.patch(enable_autograd_cache=False)
    with bypass:
        return compile_fx(gm, example_inputs, config_patches=patches)
