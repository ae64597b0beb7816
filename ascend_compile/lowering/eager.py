"""Debug lowering: run the passes on Dynamo's graph and execute it op by op."""

from __future__ import annotations

INPLACE_BROADCAST = True  # broadcast_ into fresh buffers: no layer copies
WRAP_AROUND = True  # window ops (runtime/windows.py) run as opaque custom ops
PINS_ORDER = False  # the FX interpreter runs nodes exactly in graph order


def compile(gm, example_inputs, pipeline, options):
    if pipeline is not None:
        gm = pipeline(gm)
    return gm.forward
