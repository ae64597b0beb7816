"""Which ranks share weights with each other: the ``share_size`` blocks of a process group.

A group of ``n`` ranks splits into ``n / K`` blocks of ``K`` consecutive group ranks; block ``b``
holds group ranks ``[b*K, (b+1)*K)`` and owns a whole copy of the shared layers among them
(layer ``i`` on its rank ``i % K``). ``K`` is the group's size (``share_size=None``), a number, or
``"machine"``: the group's ranks on one machine, from the launcher (global ranks ``[m*L, (m+1)*L)``
run on machine ``m``, ``L`` from torchrun or ``ranks_per_machine``: ``ranks_per_machine``). Everything here is
arithmetic on values every rank has: no collective. ``check_machines`` checks the blocks against
the machines the ranks report at shard time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import Any, Optional, Sequence

from ..config import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The blocks of one group: ``members[b]`` are block ``b``'s global ranks in group-rank order."""

    size: int
    members: tuple
    asked: Any = None  # share_size as configured: None, an int or "machine"

    def index_of(self, global_rank: int) -> int:
        for b, ranks in enumerate(self.members):
            if global_rank in ranks:
                return b
        raise ValueError(f"rank {global_rank} is in none of the blocks {list(self.members)}")

    def rank_in_block(self, global_rank: int) -> int:
        return self.members[self.index_of(global_rank)].index(global_rank)

    def describe(self) -> str:
        if len(self.members) == 1:
            return f"one block of {self.size} ranks"
        return f"{len(self.members)} blocks of {self.size} ranks: " + " ".join(str(list(m)) for m in self.members)


def divisors(n: int) -> list:
    """The sizes a group of ``n`` ranks splits into (2 or more ranks a block)."""
    return [k for k in range(2, n + 1) if n % k == 0]


def machine_name() -> str:
    """This rank's machine, as ranks report it to each other at shard time."""
    return socket.gethostname()


def ranks_per_machine(explicit: Optional[int] = None) -> Optional[int]:
    """Ranks of the job on one machine: ``explicit``, else torchrun's ``WORLD_SIZE / GROUP_WORLD_SIZE``
    (its machines), else ``LOCAL_WORLD_SIZE``. torchrun's own count comes first because platforms
    rewrite ``LOCAL_WORLD_SIZE`` (vLLM's CPU platform sets it to the tensor-parallel size)."""
    if explicit is not None:
        return explicit
    world, machines = _positive(os.environ.get("WORLD_SIZE")), _positive(os.environ.get("GROUP_WORLD_SIZE"))
    if world and machines and world % machines == 0:
        return world // machines
    return _positive(os.environ.get("LOCAL_WORLD_SIZE"))


def _positive(value: Optional[str]) -> Optional[int]:
    return int(value) if value and value.isdigit() and int(value) > 0 else None


def sizes_within_machines(machines: Sequence) -> list:
    """The block sizes whose every block lies on one machine (``machines``: one entry per group rank)."""
    n = len(machines)
    return [k for k in divisors(n) if all(len(set(machines[b * k:(b + 1) * k])) == 1 for b in range(n // k))]


def split(group_ranks: Sequence[int], share_size: Any = None, per_machine: Optional[int] = None,
          group: str = "") -> Blocks:
    """The blocks of a group whose global ranks, in group-rank order, are ``group_ranks``.
    The same on every rank that passes the same values: a refusal here is raised by every rank."""
    ranks, n = list(group_ranks), len(group_ranks)
    where = f"process group {group!r}" if group else "the process group"
    if share_size is None:
        size = n
    elif share_size == "machine":
        per = ranks_per_machine(per_machine)
        if per is None:
            raise ConfigError(
                "share_size='machine' needs to know which ranks run on one machine: start the ranks with torchrun "
                "(WORLD_SIZE / GROUP_WORLD_SIZE, or LOCAL_WORLD_SIZE), set SharedWeightConfig(ranks_per_machine=...), "
                "or give share_size as "
                f"a number ({', '.join(map(str, divisors(n)))} divide the {n} ranks of {where})"
            )
        machines = [r // per for r in ranks]
        fits = sizes_within_machines(machines)
        runs = _runs(machines)
        if len({len(members) for _, members in runs}) != 1 or len({m for m, _ in runs}) != len(runs):
            raise ConfigError(
                f"share_size='machine': the {n} ranks of {where} are not spread evenly over machines in consecutive "
                f"blocks (global ranks {ranks} on machines {machines}, {per} ranks per machine). "
                + (f"Sizes whose blocks each stay on one machine: {fits}." if fits else
                   "No block size keeps every block on one machine.")
            )
        size = len(runs[0][1])
        if size < 2:
            raise ConfigError(
                f"share_size='machine': {where} has one rank on each machine, so there is nothing to share within a "
                f"machine. Share across machines with share_size=None (or one of {divisors(n)}), or do not shard"
            )
    else:
        size = share_size
        if n % size:
            raise ConfigError(
                f"share_size={size} does not divide the {n} ranks of {where}: use one of {divisors(n)} "
                "(or 'machine', or None for the whole group)"
            )
    return Blocks(size, tuple(tuple(ranks[b * size:(b + 1) * size]) for b in range(n // size)), share_size)


def _runs(values: list) -> list:
    """``[(value, [positions])]`` of consecutive equal values."""
    out: list = []
    for i, v in enumerate(values):
        if out and out[-1][0] == v:
            out[-1][1].append(i)
        else:
            out.append((v, [i]))
    return out


def check_machines(blocks: Blocks, machines: Sequence[str], group_ranks: Sequence[int]) -> None:
    """Check the blocks against the machines the ranks reported (``machines[i]``: group rank ``i``'s).
    The same lists on every rank: every rank raises together. A block of a number that spans
    machines is allowed (its collectives cross the slower link) and logged."""
    position = {r: i for i, r in enumerate(group_ranks)}
    spanning = [(b, sorted({machines[position[r]] for r in m})) for b, m in enumerate(blocks.members)
                if len({machines[position[r]] for r in m}) > 1]
    if not spanning:
        return
    b, names = spanning[0]
    fits = sizes_within_machines(list(machines))
    if blocks.asked == "machine":
        raise ConfigError(
            f"share_size='machine' made blocks of {blocks.size} ranks, but block {b} (global ranks "
            f"{list(blocks.members[b])}) runs on machines {names}: LOCAL_WORLD_SIZE or ranks_per_machine does not "
            "match where the ranks run. "
            + (f"Sizes whose blocks each stay on one machine: {fits}." if fits else
               "No block size keeps every block on one machine.")
        )
    log.warning("ascend_compile: share_size=%s: %d block(s) span machines (block %d on %s), so their collectives "
                "cross the link between machines; sizes that stay within one: %s",
                blocks.asked, len(spanning), b, names, fits)


def of(pg, config) -> Blocks:
    """The blocks ``config.share_size`` makes of process group ``pg``."""
    import torch.distributed as dist

    return split(dist.get_process_group_ranks(pg), config.share_size, config.ranks_per_machine, pg.group_name)


def position(pg, config) -> tuple:
    """``(rank within its block, block size)`` of this rank: who owns what, before any group of ours exists
    (vLLM's loader skips the layers this rank will not own)."""
    import torch.distributed as dist

    split_ = of(pg, config)
    return split_.rank_in_block(dist.get_rank()), split_.size
