"""AOTAutograd to aten, then the passes on the aten graph, executed op by op."""

from __future__ import annotations

INPLACE_BROADCAST = True  # broadcast_ into fresh buffers: no layer copies
WRAP_AROUND = True  # window ops (runtime/windows.py) run as opaque custom ops
PINS_ORDER = False  # the aten graph runs exactly in graph order


def compile(gm, example_inputs, pipeline, options):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fw_compiler(aten_gm, aten_inputs):
        if pipeline is not None:
            aten_gm = pipeline(aten_gm)
        return make_boxed_func(aten_gm.forward)

    return aot_autograd(fw_compiler=fw_compiler)(gm, example_inputs)
