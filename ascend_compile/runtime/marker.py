"""The marker's schema and the names shared weights go by: what sharding, the passes and the lowerings
read from a graph (no op is registered here)."""

from __future__ import annotations

import dataclasses

OP_NAMESPACE = "ascend_compile"
OP_NAME = "shared_weight"
AUTO_STEP = -1  # prefetch_step="auto" as carried by the op


@dataclasses.dataclass(frozen=True)
class Marker:
    """What the marker says of the weight it reads: its arguments after the weight, in the op's
    order (``shared_weight``'s signature below is the schema; a test holds the two equal).
    Sharding makes it, the passes read it from a graph, the torchair converter from a call."""

    series: str
    index: int
    owner: int
    group_name: str
    prefetch_step: int
    wrap_windows: int = 0
    layers: int = 0
    generation: int = 0

    def args(self) -> tuple:
        """The op's arguments after the weight: ``shared_weight(w, *marker.args())``."""
        return dataclasses.astuple(self)

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict) -> tuple:
        """``(weight, Marker)`` from the arguments of a call of the op (an FX node's, a converter's)."""
        names = ["w"] + [f.name for f in dataclasses.fields(cls)]
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        return values.pop("w"), cls(**values)


def series_windows(wrap_windows: int, layers: int) -> int:
    """Layers of a series of ``layers`` prefetched across forwards with ``wrap_windows`` asked for:
    at most all but the last (its window would be sent after its own use)."""
    return max(0, min(wrap_windows, layers - 1))


def layer_name(series: str, index: int) -> str:
    """``"o_proj.weight[3]"``: how a shared parameter is named in tables, keys and messages."""
    return f"{series}[{index}]"
