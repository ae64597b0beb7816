"""Inductor: our passes run as a post-grad custom pass on the aten graph Inductor lowers.

The pass is registered through ``torch._inductor.config.post_grad_custom_post_pass`` as a
``CustomGraphPass`` whose ``uuid()`` covers the pass sources and the plan (rank, world
size, group, prefetch step), so the FX graph cache (shared by local ranks) never hands one
rank's graph to another. Inductor reorders freely; ``pin_order`` states our order in the
graph with ``control_deps``.
"""

from __future__ import annotations

from torch._inductor.custom_graph_pass import CustomGraphPass

INPLACE_BROADCAST = True  # broadcast_ into fresh buffers: no layer copies
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


def config_patches(pipeline, options, mode=None) -> dict:
    import torch._inductor
    from torch._inductor import config

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(options.inductor)
    if pipeline is not None:
        user_pass = patches.get("post_grad_custom_post_pass", config.post_grad_custom_post_pass)
        patches["post_grad_custom_post_pass"] = SharedWeightInductorPass(pipeline, user_pass)
    return patches


def compile(gm, example_inputs, pipeline, options, mode=None):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=config_patches(pipeline, options, mode))
