"""Pure FX -> FX passes. Each takes ``(GraphModule, CompilePlan)`` and returns the GraphModule.

``PassPipeline`` is the only place that knows their order.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

from torch import fx

from ..runtime.ops import layer_name
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

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        for i, (name, fn) in enumerate(self.passes, start=1):
            if self.observer:
                self.observer(i, name, "before", gm)
            start = time.perf_counter()
            gm = fn(gm, self.plan)
            self.seconds[name] = time.perf_counter() - start
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
