"""One object per sharded model (``Sharding``): what its ranks agreed on, and what its forwards keep.

``shard_model`` makes it when it makes the model's sharing group, fills in what the ranks agree on
(generation, token, formats, costs), and hangs it on the model (``model._ascend_compile_sharding``),
on each shared parameter's parametrization and on each sliced module: code that holds a module
reaches its sharding through it. Between forwards it holds the wrap-around windows in flight and,
for ``layout="slices"``, the forward state of the sliced layers.

A graph's custom ops are called with plain values only (the group's name, the sharding's
generation), so they find their sharding in the one table of live shardings (``find``), the
newest first: a group made again under a destroyed one's name (c10d reuses names) starts clean.
"""

from __future__ import annotations

import dataclasses
import uuid
import weakref
from typing import Any, Optional

from .errors import ShardingError

ATTR = "_ascend_compile_sharding"  # on a sharded model


@dataclasses.dataclass
class Windows:
    """Wrap-around windows of one sharding (``windows.py``). ``invalidate`` empties ``slots`` and
    counts ``epoch``; ``confirmed`` is the epoch every peer reached too."""

    epoch: int = 0
    confirmed: int = 0
    slots: dict = dataclasses.field(default_factory=dict)  # (series, index) -> (buffer in flight, owner)
    series: dict = dataclasses.field(default_factory=dict)  # series -> (layers, windows): for eager forwards
    reads: list = dataclasses.field(default_factory=list)  # an eager forward's reads so far


@dataclasses.dataclass(eq=False)
class Sharding:
    group_name: str  # the group the weights move over (ours, one per sharding; a share_size block's)
    user_group: str  # the user's group it was made over (itself when the broadcasts use the user's group)
    generation: int = 0  # agreed at shard time: names this sharding among those over one group
    token: str = ""  # agreed at shard time: names its store keys, so an earlier group's never match
    costs: Optional[dict] = None  # prefetch_step="auto" measurements (slowest rank's)
    timeout: Optional[float] = None
    formats: dict = dataclasses.field(default_factory=dict)  # "series[index]" -> NPU format, if not row-major
    windows: Windows = dataclasses.field(default_factory=Windows)
    slices: Any = None  # slices.SliceState, for layout="slices"
    retired: bool = False  # its group was destroyed (abort_group)
    kept_store: Any = None  # a store this rank hosts, kept alive for the peers to read why it aborted

    @property
    def ours(self) -> bool:
        """Whether the group is ours to destroy (made for this sharding, not the user's)."""
        return self.group_name != self.user_group and not self.retired


_LIVE: list = []  # weak references to every Sharding of this process, oldest first: a model's is its own


def add(sharding: Sharding) -> Sharding:
    """Make ``sharding`` findable for as long as its model (or anything else) holds it."""
    _LIVE[:] = [ref for ref in _LIVE if ref() is not None]
    _LIVE.append(weakref.ref(sharding))
    return sharding


def _live() -> list:
    return [s for s in (ref() for ref in _LIVE) if s is not None]


def find(group_name: str, generation: int = 0) -> Optional[Sharding]:
    """The newest sharding over ``group_name`` (of ``generation``, when not 0), or None."""
    for s in reversed(_live()):
        if s.group_name == group_name and generation in (0, s.generation):
            return s
    return None


def get(group_name: str, generation: int = 0) -> Sharding:
    """``find``, or a ShardingError saying that nothing was sharded over the group here."""
    found = find(group_name, generation) or find(group_name)
    if found is None:
        raise ShardingError(
            f"no model was sharded over process group {group_name!r} in this process: a graph with shared "
            "weights is compiled where shard_model(...) was not called. Call ascend_compile.shard_model on every "
            "rank before compiling."
        )
    return found


def over(user_group: str) -> list:
    """The live shardings made over the user's group ``user_group`` (or over it directly)."""
    return [s for s in _live() if (s.user_group == user_group or s.group_name == user_group) and not s.retired]


def user_group_of(group_name: str) -> str:
    """The name of the user's group that ``group_name`` was made over (itself if it is the user's)."""
    found = find(group_name)
    return found.user_group if found is not None else group_name


def any_sharding() -> bool:
    """Whether a model was sharded in this process."""
    return bool(_live())


def proposed_generation(group_name: str) -> int:
    """This rank's proposal for the next sharding generation over ``group_name`` (agreed as the max)."""
    return max((s.generation for s in _live() if s.group_name == group_name), default=0) + 1


def new_token() -> str:
    """A proposal for a sharding's token (the ranks take rank 0's)."""
    return uuid.uuid4().hex[:12]


def of_model(model) -> Optional[Sharding]:
    return getattr(model, ATTR, None)
