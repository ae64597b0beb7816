"""Pure FX -> FX passes. Each takes ``(GraphModule, CompilePlan)``, rewrites the GraphModule in
place and returns it (Inductor runs them on its own graph and ignores what they return).

``PassPipeline`` is the only place that knows their order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import time
import warnings
from typing import Callable, Optional

from torch import fx

from ..runtime.marker import layer_name
from .graph import collective_pairs
from .npu_streams import assign_broadcast_stream
from .pin_order import EDGES_META, pin_collective_order
from .plan import CompilePlan
from .prefetch import collective_schedule, schedule_prefetch
from .shared_weight import rewrite_shared_weights
from .verify import ScheduleError, verify_schedule

Pass = Callable[[fx.GraphModule, CompilePlan], fx.GraphModule]


@dataclasses.dataclass
class PassPipeline:
    """Runs the passes in order; reports each graph before/after to ``observer`` (dumps)."""

    plan: CompilePlan
    passes: list  # [(name, Pass)]
    observer: Optional[Callable[[int, str, str, fx.GraphModule], None]] = None
    final_schedule: Optional[list] = None  # collective_schedule of the last graph run
    seconds: dict = dataclasses.field(default_factory=dict)  # pass name -> wall time of its last run
    ordering_edges: Optional[list] = None  # [(before, after)] node names pin_order asked for
    ordering_report: Optional[dict] = None  # what of them reached the lowering's scheduler
    layer_nodes: dict = dataclasses.field(default_factory=dict)  # node name -> "series[index]" it issues/waits
    runs: int = 0  # graphs it ran on (a lowering checks that its compiler called it)

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        self.runs += 1
        for i, (name, fn) in enumerate(self.passes, start=1):
            if self.observer:
                self.observer(i, name, "before", gm)
            with transform_observer(gm, name):
                start = time.perf_counter()
                out = fn(gm, self.plan)
                self.seconds[name] = time.perf_counter() - start
            if out is not gm:
                raise TypeError(f"pass {name!r} returned a new GraphModule: a pass must rewrite the one it is given, "
                                "in place, and return it")
            if self.observer:
                self.observer(i, name, "after", gm)
        self.final_schedule = collective_schedule(gm.graph)
        self.layer_nodes = {
            node.name: layer_name(*key) for key, pair in collective_pairs(gm.graph).items() for node in pair.values()
        }
        self.ordering_edges = gm.meta.get(EDGES_META)
        return gm

    def uuid(self) -> str:
        """Source of every pass plus the plan: changes either and caches miss."""
        from torch._inductor.custom_graph_pass import get_hash_for_files

        here = os.path.dirname(os.path.abspath(__file__))
        files = tuple(sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py")))
        extra = repr((sorted(self.plan.key().items()), [name for name, _ in self.passes]))
        return get_hash_for_files(files, extra).hex()


def transform_observer(gm: fx.GraphModule, name: str):
    """Inductor's ``GraphTransformObserver`` for our pass ``name``, as ``ascend_compile_<name>``.

    With ``torch._inductor.config.trace.log_url_for_graph_xform`` set it writes the graph before
    and after the pass into that folder (``pass_<n>_ascend_compile_<name>_input_graph.dot`` and
    ``..._output_graph.dot``, for a pass that created or erased nodes), beside Inductor's own
    passes; with ``trace.provenance_tracking_level`` 1 it records the nodes the pass created.
    Unset, it does nothing. Drawing needs pydot: with a log_url set and no pydot, the pass runs
    without the observer (which would raise) and Python's warning filter shows why once per process;
    Inductor's own passes still fail there.
    """
    from torch._inductor import config as inductor_config
    from torch.fx.passes import graph_drawer
    from torch.fx.passes.graph_transform_observer import GraphTransformObserver

    if inductor_config.trace.log_url_for_graph_xform is not None and not _has_pydot(graph_drawer):
        warnings.warn("ascend_compile: torch._inductor.config.trace.log_url_for_graph_xform is set but pydot is not "
                      "installed: our passes are not drawn (pip install pydot)", RuntimeWarning, stacklevel=2)
        return contextlib.nullcontext()
    return GraphTransformObserver(gm, f"ascend_compile_{name}")


def _has_pydot(graph_drawer) -> bool:
    has = getattr(graph_drawer, "HAS_PYDOT", None)  # what torch's FxGraphDrawer itself checked
    return has if has is not None else importlib.util.find_spec("pydot") is not None


def default_passes(pin: bool, streams: bool = False) -> list:
    """rewrite -> schedule -> state the order (control_deps for Inductor, streams for torchair) -> verify."""
    passes = [("shared_weight", rewrite_shared_weights), ("prefetch", schedule_prefetch)]
    if pin:
        passes.append(("pin_order", pin_collective_order))
    if streams:
        passes.append(("npu_streams", assign_broadcast_stream))
    passes.append(("verify", verify_schedule))
    return passes


__all__ = [
    "CompilePlan", "PassPipeline", "ScheduleError", "collective_schedule", "default_passes",
    "pin_collective_order", "rewrite_shared_weights", "schedule_prefetch", "verify_schedule",
]
