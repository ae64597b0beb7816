"""Debug lowering: run the passes on Dynamo's graph and execute it op by op."""

from __future__ import annotations

INPLACE_BROADCAST = True  # broadcast_ into fresh buffers: no layer copies
PINS_ORDER = False  # the FX interpreter runs nodes exactly in graph order


def compile(gm, example_inputs, pipeline, options):
    if pipeline is not None:
        gm = pipeline(gm)
    return gm.forward
