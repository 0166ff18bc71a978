"""Which samples each rank and each of its DataLoader workers reads, from the manifest alone.

A pure function of the shard list (and of seed/epoch in training), so every rank computes the
same assignment, and the epoch length that follows from it, without talking to the others.
A holdout likewise sets aside whole shards, so its counts stay known from the manifest too.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from ds_trainer.data.manifest import ShardInfo
from ds_trainer.errors import DataError


@dataclass(frozen=True)
class ShardPart:
    """A shard as one rank reads it: all of it, or (stride > 1) every stride-th sample."""

    url: str
    generator: str
    count: int
    offset: int  # index of the shard's first sample within the whole selection
    kept: int  # samples of this shard the rank keeps


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads: one list of parts per worker stream, and how samples are kept."""

    worker_parts: list[list[ShardPart]]
    num_workers: int  # DataLoader num_workers; 0 = read in the main process
    stride: int  # 1: whole shards per rank; world_size: keep index % world_size == rank

    @property
    def samples_per_worker(self) -> list[int]:
        return [sum(p.kept for p in parts) for parts in self.worker_parts]


def _kept_below(n: int, rank: int, world_size: int) -> int:
    """How many i in [0, n) have i % world_size == rank."""
    return max(0, (n - rank + world_size - 1) // world_size)


def _balance(parts: list[ShardPart], bins: int) -> list[list[ShardPart]]:
    # Longest-processing-time assignment: sizes as even as shards allow. Shard counts are
    # mostly equal, so ties are broken by the given order (which a train epoch shuffles).
    # A lighter bin repeats its samples more often in training, hence the balancing.
    out: list[list[ShardPart]] = [[] for _ in range(bins)]
    loads = [0] * bins
    for part in sorted(parts, key=lambda p: p.kept, reverse=True):
        i = min(range(bins), key=lambda b: (loads[b], b))
        out[i].append(part)
        loads[i] += part.kept
    return [sorted(b, key=lambda p: p.offset) for b in out]


def plan_rank(
    shards: list[ShardInfo],
    rank: int,
    world_size: int,
    num_workers: int,
    shuffle_seed: str | None = None,
) -> RankPlan:
    """Assign shards to this rank, then to its DataLoader workers.

    With at least world_size shards each rank reads whole shards. With fewer, every rank reads
    all shards and keeps samples whose index % world_size == rank, so no rank is left empty.
    Workers are min(num_workers, parts this rank reads), so no worker is ever idle.
    `shuffle_seed` (train) reshuffles which shards go to which rank, identically on all ranks.
    """
    parts: list[ShardPart] = []
    offset = 0
    for s in shards:
        parts.append(ShardPart(s.url, s.generator, s.count, offset, s.count))
        offset += s.count
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(parts)

    if len(parts) >= world_size:
        stride = 1
        mine = _balance(parts, world_size)[rank]
    else:
        stride = world_size
        mine = []
        for p in sorted(parts, key=lambda p: p.offset):
            end = p.offset + p.count
            kept = _kept_below(end, rank, world_size) - _kept_below(p.offset, rank, world_size)
            # a shard counted 0 (a hand-edited manifest) is still read, by one rank: what its tar
            # holds after all is scored (tar_stream._owner)
            if kept or (p.count == 0 and p.offset % world_size == rank):
                mine.append(replace(p, kept=kept))

    workers = min(num_workers, len(mine))
    worker_parts = _balance(mine, workers) if workers > 1 else [mine]
    return RankPlan(worker_parts=worker_parts, num_workers=workers, stride=stride)


def split_holdout(shards: list[ShardInfo], fraction: float, name: str) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """(kept, held out): per generator, round(fraction x shards) of its shards, evenly spread.

    Whole shards, so every count stays known from the manifest (equal batches per rank).
    """
    kept: list[ShardInfo] = []
    held: list[ShardInfo] = []
    by_generator: dict[str, list[ShardInfo]] = {}
    for s in shards:
        by_generator.setdefault(s.generator, []).append(s)
    for generator, group in sorted(by_generator.items()):
        n_held = round(fraction * len(group))
        if n_held < 1 or n_held >= len(group):
            raise DataError(
                f"{name}: holdout_fraction {fraction:g} of {generator}'s {len(group)} shard(s) leaves "
                f"{'nothing to hold out' if n_held < 1 else 'nothing to train on'}; re-shard with a smaller "
                "--max-count so each generator has more shards, or change data.holdout_fraction"
            )
        picks = {math.floor((i + 0.5) * len(group) / n_held) for i in range(n_held)}
        for i, s in enumerate(group):
            (held if i in picks else kept).append(s)
    return kept, held
