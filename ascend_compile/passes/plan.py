"""The plan every pass takes: who we are and how to schedule. Passes never look ranks up."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import fx

from ..runtime.marker import layer_name
from .graph import is_marker, marker_args


@dataclasses.dataclass(frozen=True)
class CompilePlan:
    rank: int
    world_size: int
    group_name: str
    prefetch_step: Optional[int] = None  # overrides the step carried by the markers
    pin_order: bool = True
    inplace: bool = False  # broadcast_ into a fresh buffer / from the owner's parameter (no copies)
    formats: tuple = ()  # (("series[index]", NPU format), ...) of weights not stored row-major
    wrap: tuple = ()  # (("series", w), ...): series whose first w layers come from the previous forward
    generation: int = 0  # the sharding of the model this graph belongs to (0: the group's latest)

    def wrap_of(self, series: str) -> int:
        """Windows of ``series`` prefetched across steps in this graph (0: none)."""
        return dict(self.wrap).get(series, 0)

    def format_of(self, series: str, index: int):
        return dict(self.formats).get(layer_name(series, index))

    def step_for(self, marker_step: int, series: str) -> int:
        step = self.prefetch_step if self.prefetch_step is not None else marker_step
        if step < 0:
            raise ValueError(
                f"series {series!r} has no prefetch step (got {step}); pass options['prefetch_step']"
            )
        return step

    def key(self) -> dict:
        """What must be part of every cache key."""
        return dataclasses.asdict(self)


def marker_groups(graph: fx.Graph) -> set:
    return {marker_args(n).group_name for n in graph.nodes if is_marker(n)}


def markers_by_series(graph: fx.Graph) -> dict:
    """``{series: [MarkerArgs of each marker reading it]}``, series sorted by name."""
    out: dict = {}
    for n in graph.nodes:
        if is_marker(n):
            a = marker_args(n)
            out.setdefault(a.series, []).append(a)
    return dict(sorted(out.items()))
