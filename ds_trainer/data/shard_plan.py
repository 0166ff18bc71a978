"""The shard plan: which images go into which shard, under which keys, in which order.

A deterministic function of the scan (sorted file list, seeded stratified shuffle, cut by count
and bytes), so a re-run plans the same shards and can recognise the ones already written: each
shard's plan has a digest that its sidecar records.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ds_trainer.data.scan import ImageRecord, ScanResult
from ds_trainer.errors import DataError

SIDECAR_FORMAT = "ds_trainer.shard"
# bump when what a shard holds for the same plan changes, so old shards are rewritten on resume
SIDECAR_VERSION = 2
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(value: int | str | None) -> int | None:
    """'1GB' / '500MB' / '2GiB' / '123456' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if value is None or isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise DataError(f"shard size '{value}' is not a size; use e.g. 1GB, 500MB, 2GiB or a byte count")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size is not None and size < 1:
        raise DataError(f"shard size must be at least 1 byte (got {value})")
    return size


def _safe_key_part(name: str) -> str:
    # webdataset splits "key.ext" at the FIRST dot, and "/" would make a tar directory
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _mixed_order(records: list[ImageRecord], rng: random.Random, chunk: int) -> list[ImageRecord]:
    """Shuffled order in which every run of `chunk` samples has both labels in the overall ratio.

    A plain shuffle leaves small shards (the last one of a split) single-class by chance; here
    each class is shuffled, spread evenly over [0, 1), merged, and each chunk shuffled again.
    """
    keyed: list[tuple[float, float, ImageRecord]] = []
    for label in (1, 0):
        group = [r for r in records if r.label == label]
        rng.shuffle(group)
        keyed.extend(((i + 0.5) / len(group), rng.random(), r) for i, r in enumerate(group))
    merged = [r for _, _, r in sorted(keyed, key=lambda t: (t[0], t[1]))]
    out: list[ImageRecord] = []
    for start in range(0, len(merged), chunk):
        part = merged[start : start + chunk]
        rng.shuffle(part)
        out.extend(part)
    return out


class PlannedSample(NamedTuple):
    """One sample as planned: a plain tuple, so a pool ships thousands of them cheaply."""

    path: str  # absolute source file
    rel: str  # relative to the source root, recorded in the sample metadata
    label: int
    key: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ShardJob:
    """Everything a pool worker needs to write one shard, with no reference to shared state."""

    out: str
    rel: str  # <generator>/<split>/shard-NNNNNN.tar
    generator: str
    split: str
    samples: tuple[PlannedSample, ...]
    digest: str
    verify: bool = True
    # real path of the source root: a file that now resolves outside it is not read (None: read all)
    confine: str | None = None

    @property
    def sidecar_rel(self) -> str:
        return self.rel[: -len(".tar")] + ".json"


def _tar_bytes_estimate(sample: PlannedSample) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per member, data padded to 512 (json ~ path + 250)."""

    def padded(n: int) -> int:
        return 512 + -(-n // 512) * 512

    return padded(sample.size) + padded(1) + padded(len(sample.rel.encode()) + 250)


_TAR_END = 10240  # end-of-archive blocks, padded to tarfile's record size


def _cut(order: list[PlannedSample], max_count: int, max_size: int | None) -> Iterator[list[PlannedSample]]:
    """Consecutive runs of the plan, each within max_count samples and (estimated) max_size bytes.

    A single image larger than max_size still gets a shard of its own rather than failing the run.
    """
    part: list[PlannedSample] = []
    used = _TAR_END
    for sample in order:
        add = _tar_bytes_estimate(sample)
        too_big = max_size is not None and part and used + add > max_size
        if len(part) == max_count or too_big:
            yield part
            part, used = [], _TAR_END
        part.append(sample)
        used += add
    if part:
        yield part


def _digest(rel: str, samples: list[PlannedSample], verify: bool) -> str:
    """Fingerprint of a shard's plan: which files, in which order, under which keys, at which size/mtime,
    and whether they were decoded (an unverified shard must not pass for a verified one on resume)."""
    plan = [SIDECAR_VERSION, rel, verify, [(s.rel, s.label, s.key, s.size, s.mtime_ns) for s in samples]]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def _key_prefixes(generators: list[str]) -> dict[str, str]:
    safe_names: dict[str, str] = {}
    for gen in sorted(generators):
        safe = _safe_key_part(gen)
        if safe in safe_names.values():
            safe = f"{safe}_{len(safe_names)}"
        safe_names[gen] = safe
    return safe_names


def plan_shards(
    scan: ScanResult, out: Path, seed: int, max_count: int, max_size: int | None, verify: bool = True
) -> list[ShardJob]:
    """The deterministic shard plan: same tree, seed and limits give the same shards and keys.

    Keys number the samples of a generator/split in planned order, so a shard's keys do not
    depend on which other files turned out unreadable.
    """
    groups: dict[tuple[str, str], list[ImageRecord]] = {}
    for rec in scan.records:
        groups.setdefault((rec.generator, rec.split), []).append(rec)
    prefixes = _key_prefixes([g for g, _ in groups])
    confine = None if scan.follow_symlinks else os.path.realpath(scan.root)
    jobs: list[ShardJob] = []
    for (gen, split), recs in sorted(groups.items()):
        order = _mixed_order(recs, random.Random(f"{seed}:{gen}:{split}"), max_count)
        planned = [
            PlannedSample(str(r.path), r.path.relative_to(scan.root).as_posix(), r.label,
                          f"{prefixes[gen]}-{split}-{i:07d}", r.size, r.mtime_ns)
            for i, r in enumerate(order)
        ]  # fmt: skip
        for n, part in enumerate(_cut(planned, max_count, max_size)):
            rel = f"{gen}/{split}/shard-{n:06d}.tar"
            digest = _digest(rel, part, verify)
            jobs.append(ShardJob(str(out), rel, gen, split, tuple(part), digest, verify, confine))
    return jobs
