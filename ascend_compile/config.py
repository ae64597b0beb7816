"""User-facing configuration objects, validated up front with errors that say how to fix them."""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping, Optional, Sequence, Union

PrefetchStep = Union[int, str]

LAYOUTS = ("layers", "slices")
PATHS = ("agreed", "by_shape")  # how a sliced forward picks its path (SharedWeightConfig.paths)
LOWERINGS = ("inductor", "aot_eager", "eager", "torchair")
DUMP_ENV = "ASCEND_COMPILE_DUMP"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the value and the fix."""


def _close(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def check_prefetch_step(value: Any, where: str = "prefetch_step") -> PrefetchStep:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{where} must be a non-negative int or 'auto', got {value!r}. "
            "Use 0 to fetch each layer at its use, 1 to fetch one layer ahead, ..."
        )
    if value < 0:
        raise ConfigError(
            f"{where} must be >= 0, got {value}. "
            "Use 0 to fetch each layer at its use, k > 0 to fetch k layers ahead, or 'auto'."
        )
    return value


def check_share_size(value: Any, where: str = "share_size") -> Optional[Union[int, str]]:
    if value is None or value == "machine":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(
            f"{where} must be an int >= 2 that divides the group's size (2, 4, 8, 16, ...), 'machine' (the ranks "
            f"on one machine) or None (the whole group), got {value!r}"
        )
    return value


@dataclasses.dataclass
class SharedWeightConfig:
    """Which repeated layers to share across ranks, and how far ahead to fetch them.

    ``layers``: name suffixes; every module whose qualified name ends with one of them
    (``"o_proj"`` matches ``model.layers.3.self_attn.o_proj``) joins that series.
    ``prefetch_step``: broadcast layer ``i + k`` while layer ``i`` computes (``0`` =
    fetch at use), or ``"auto"`` to let the cost model choose.
    ``group``: the process group to share over (default: the default group).
    ``params``: which of each layer's own parameters to share; ``None`` = all of them.
    ``timeout``: seconds after which a broadcast that a peer does not join raises (a dead or
    diverged rank) instead of blocking; sets the sharing group's timeout at shard time (it then
    bounds every collective of that group). ``None`` keeps the group's own timeout.
    ``wrap_around``: prefetch across steps. A compiled graph that holds a whole series broadcasts
    its first ``w`` layers for the next forward during its own last layers, into windows that
    persist between forwards (``w`` = ``prefetch_step``, 1 for ``"auto"``, none for ``0``), so
    the next forward does not wait for them at its entry. Costs ``w`` layers of memory held
    between forwards. After changing weights call ``invalidate_prefetch`` on every rank.
    ``False`` fetches every layer within its own forward. ``None`` (the default): on, unless the
    default lowering is ``torchair`` (an NPU stack is importable), which has no wrap-around.
    Every forward of the model, compiled or eager, then follows the same schedule; a compiled
    graph must hold each series whole (no graph break inside it), or shard with ``False``.
    ``layout``: ``"layers"`` keeps layer ``i`` whole on rank ``i % K`` and broadcasts it before use;
    ``"slices"`` keeps ``1/K`` of every layer on every rank (plain linear layers whose cut dimension
    divides by ``K``): forwards with at most ``decode_tokens`` tokens on every rank compute on the
    slices and move activations, larger ones gather each weight ``prefetch_step`` layers ahead.
    Same memory saved. No wrap-around.
    ``decode_tokens``: with ``"slices"``, the largest token count (the most of any rank in a
    forward) computed on the slices; ``"auto"`` (the default) measures both paths at shard time.
    ``paths``: with ``"slices"``, how a forward's path is picked. ``"agreed"`` (the default): at its
    first sliced layer the ranks agree on the largest token count of any rank (vLLM's
    ``num_tokens_across_dp`` when there is one, else an all-reduce and a host sync), so ranks may run
    different token counts. ``"by_shape"``: each sliced layer takes the path its own input's token
    count gives, with no agreement, no host sync and nothing read from Python state between layers,
    so a captured graph (CUDA/ACL graphs, ``mode="reduce-overhead"``) replays its size's path
    correctly. Every rank of the block must then run the same token count in every forward, as
    vLLM's data-parallel padding gives under graph capture (checked against it inside vLLM).
    ``share_size``: share among blocks of this many consecutive ranks of ``group`` instead of all of
    them (``None``): ``2``, ``4``, ``8``, ... (must divide the group's size), or ``"machine"``: the
    group's ranks on one machine. Each block owns a whole copy of the shared layers among its ranks
    and has its own process group, schedule and failures; no collective crosses blocks. Smaller
    blocks save less memory (``(K-1)/K`` of the series) over faster links.
    ``ranks_per_machine``: for ``share_size="machine"``, ranks of the whole job on one machine
    (default: torchrun's ``WORLD_SIZE / GROUP_WORLD_SIZE``, else ``LOCAL_WORLD_SIZE``); global ranks
    ``[m*n, (m+1)*n)`` are machine ``m``.
    """

    layers: Sequence[str]
    prefetch_step: PrefetchStep = 1
    group: Any = None
    params: Optional[Sequence[str]] = None
    timeout: Optional[float] = None
    wrap_around: Optional[bool] = None
    layout: str = "layers"
    decode_tokens: Optional[Union[int, str]] = None
    paths: Optional[str] = None
    share_size: Optional[Union[int, str]] = None
    ranks_per_machine: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = [self.layers]
        if not self.layers or not all(isinstance(x, str) and x for x in self.layers):
            raise ConfigError(
                f"layers must be a non-empty list of layer names such as ['o_proj'], got {self.layers!r}"
            )
        dupes = sorted({x for x in self.layers if list(self.layers).count(x) > 1})
        if dupes:
            raise ConfigError(f"layers lists {dupes} more than once; list each series once")
        self.layers = list(self.layers)
        self.prefetch_step = check_prefetch_step(self.prefetch_step)
        if self.params is not None:
            self.params = list(self.params)
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or self.timeout <= 0):
            raise ConfigError(
                f"timeout must be a number of seconds > 0 (or None for the process group's own), got {self.timeout!r}"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "slices":
            if self.wrap_around:
                raise ConfigError("layout='slices' has no wrap-around prefetch: drop wrap_around=True")
            self.wrap_around = False
            if self.params is None:
                self.params = ["weight"]  # the bias stays whole on every rank
            if self.decode_tokens is None:
                self.decode_tokens = "auto"
            if self.decode_tokens != "auto" and (isinstance(self.decode_tokens, bool)
                                                 or not isinstance(self.decode_tokens, int) or self.decode_tokens < 0):
                raise ConfigError(f"decode_tokens must be an int >= 0 or 'auto', got {self.decode_tokens!r}")
            if self.paths is None:
                self.paths = "agreed"
            if self.paths not in PATHS:
                raise ConfigError(f"paths must be one of {list(PATHS)}, got {self.paths!r}")
        else:
            for name in ("decode_tokens", "paths"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} chooses between the two paths of layout='slices'; with layout='layers' "
                                      f"every forward broadcasts whole layers: drop it or set layout='slices'")
        self.share_size = check_share_size(self.share_size)
        if self.ranks_per_machine is not None and (isinstance(self.ranks_per_machine, bool)
                                                   or not isinstance(self.ranks_per_machine, int)
                                                   or self.ranks_per_machine < 1):
            raise ConfigError(f"ranks_per_machine must be an int >= 1 (or None for the launcher's count), "
                              f"got {self.ranks_per_machine!r}")
        if self.wrap_around is None:
            self.wrap_around = default_lowering() != "torchair"
        if not isinstance(self.wrap_around, bool):
            raise ConfigError(f"wrap_around must be True or False, got {self.wrap_around!r}")

    def wrap_windows(self) -> int:
        """Windows per series prefetched for the next forward (0: no wrap-around)."""
        if not self.wrap_around:
            return 0
        return 1 if self.prefetch_step == "auto" else self.prefetch_step

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SharedWeightConfig":
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in fields:
                raise ConfigError(
                    f"unknown shared_weight option {key!r}; known options: {fields}.{_close(key, fields)}"
                )
        if "layers" not in d:
            raise ConfigError("shared_weight config needs 'layers', e.g. {'layers': ['o_proj']}")
        return cls(**d)


@dataclasses.dataclass
class CompileOptions:
    """Options of ``torch.compile(..., backend="ascend_compile", options={...})``.

    ``lowering``: ``"inductor"`` (default off-NPU), ``"aot_eager"``, ``"eager"`` (debug) or
    ``"torchair"`` (default when ``torch_npu`` imports).
    ``dump_dir``: per-rank graph dumps (also ``ASCEND_COMPILE_DUMP``).
    ``prefetch_step``: overrides the step the model was sharded with.
    ``pin_order``: state the collective order in the graph so the lowering cannot change it.
    ``check_ranks``: compare each compiled graph's collective order with the other ranks'
    through the process group's store (never a collective) and raise on a mismatch instead of
    deadlocking; turn collective failures into errors that name the graph and the layer.
    ``cost_model``: inputs of the ``prefetch_step="auto"`` cost model that replace its
    measurements (``bandwidth`` B/s, ``latency_s``, ``compute_s`` per layer, ``memory_budget`` B).
    ``inductor``: extra ``torch._inductor.config`` patches. ``torchair``: torchair settings.
    """

    lowering: Optional[str] = None
    dump_dir: Optional[str] = None
    prefetch_step: Optional[PrefetchStep] = None
    pin_order: bool = True
    check_ranks: bool = True
    cost_model: dict = dataclasses.field(default_factory=dict)
    inductor: dict = dataclasses.field(default_factory=dict)
    torchair: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lowering is None:
            self.lowering = default_lowering()
        if self.lowering not in LOWERINGS:
            raise ConfigError(
                f"unknown lowering {self.lowering!r}; choose one of {list(LOWERINGS)}.{_close(str(self.lowering), LOWERINGS)}"
            )
        if self.dump_dir is None:
            self.dump_dir = os.environ.get(DUMP_ENV) or None
        if self.prefetch_step is not None:
            self.prefetch_step = check_prefetch_step(self.prefetch_step, "options['prefetch_step']")
        for name in ("cost_model", "inductor", "torchair"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"options[{name!r}] must be a dict, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "CompileOptions":
        if d is None:
            return cls()
        if isinstance(d, CompileOptions):
            return d
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in fields:
                raise ConfigError(
                    f"unknown ascend_compile option {key!r}; known options: {fields}.{_close(key, fields)}"
                )
        return cls(**dict(d))


def default_lowering() -> str:
    """``torchair`` when an NPU stack is importable, else ``inductor``; never imports torch_npu."""
    import importlib.util

    try:
        found = importlib.util.find_spec("torch_npu") is not None
    except ValueError:  # a module object without a spec (a test double) stands in for it
        found = True
    return "torchair" if found else "inductor"
