"""GenImage folder tree -> WebDataset tar shards + manifest.json: the sharding run, stage by stage.

Output layout: <out>/<generator>/<split>/shard-000000.tar (+ shard-000000.json sidecar) ... and
<out>/manifest.json.

The manifest is the only thing the streaming loader trusts for sample counts, which is what
lets every rank compute the same epoch length without talking to the others. So every image is
fully decoded before it goes into a shard (a file that does not decode is skipped and listed),
and the manifest is written last: a directory without one is unfinished.

Sharding is a deterministic plan (sorted file list, seeded stratified shuffle, cut by count and
bytes), executed one shard per task in a process pool. Each finished shard gets a sidecar JSON
naming the plan it was written from; a re-run keeps every shard whose sidecar matches its plan,
so an interrupted run resumes instead of starting over.

The stages: scan (ds_trainer.data.scan), plan (shard_plan), write (shard_write), manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ds_trainer.data.layouts import scan_layout
from ds_trainer.data.manifest import MANIFEST_NAME, atomic_write_json, build_manifest, warn_about
from ds_trainer.data.manifest_checks import MAX_SHARD_SAMPLES
from ds_trainer.data.shard_plan import parse_size, plan_shards
from ds_trainer.data.shard_write import clean_stale, default_workers, reusable_sidecar, run_jobs
from ds_trainer.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class ShardReport:
    """The outcome of a sharding run: the manifest as written, plus what this run itself did."""

    manifest: dict[str, Any]
    out: Path
    written: int = 0
    reused: int = 0


def shard_genimage(
    src: str | Path,
    out: str | Path,
    *,
    max_count: int = 1000,
    max_size: int | str | None = None,
    generators: list[str] | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    verify: bool = True,
    follow_symlinks: bool = False,
    layout: str = "genimage",
) -> ShardReport:
    """Write one shard set per generator/split from a GenImage tree; the report has the manifest dict.

    `layout` reads `src` as another dataset shape instead (ds_trainer.data.layouts): `binary-folders`
    (UnivFD/ForenSynths/Chameleon: [<split>/][<generator>/][<category>/]{0_real,1_fake}/) or `list`
    (`src` is a CSV/JSONL file of path, label, generator[, split]); the plan and writer are the same.

    Samples of a generator/split are shuffled (deterministically from `seed`) before being cut
    into shards of at most `max_count` samples and `max_size` bytes (int, or '1GB'), so every
    shard mixes ai and nature images. Every image is fully decoded first, by `workers`
    processes (default: all CPUs); files that do not decode are skipped and listed in the
    manifest. Re-running into the same `out` keeps the shards that are already complete, and the
    report tells how many shards this run wrote and how many it kept from before.
    Symbolic links leading outside `src` are skipped and listed unless `follow_symlinks`; links
    that stay inside `src` are followed. The manifest holds no absolute paths: shard paths are
    relative to `out`, skipped files relative to `src`, and `source` is the name of `src`.

    verify=False only checks each file's header (the pre-verification behaviour): for tests of
    the loader's own handling of corrupt samples, never for training data.
    """
    if not 1 <= max_count <= MAX_SHARD_SAMPLES:
        raise DataError(f"max_count must be in [1, {MAX_SHARD_SAMPLES}] (got {max_count})")
    size_limit = parse_size(max_size)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be >= 1 (got {workers})")
    out_path = Path(out)
    logger.info("scanning %s", src)
    scan = scan_layout(layout, src, generators, follow_symlinks=follow_symlinks)
    logger.info("%d images in %d generator folder(s); %d file(s) passed over", len(scan.records),
                len(scan.generators), len(scan.skipped))  # fmt: skip
    out_path.mkdir(parents=True, exist_ok=True)
    # an old manifest next to half-rewritten shards would give loaders wrong counts, and wrong
    # counts mean unequal epoch lengths across ranks; better no manifest until we are done
    (out_path / MANIFEST_NAME).unlink(missing_ok=True)
    jobs = plan_shards(scan, out_path, seed, max_count, size_limit, verify)
    clean_stale(out_path, scan.splits, jobs)

    sidecars = {j.rel: sc for j in jobs if (sc := reusable_sidecar(j)) is not None}
    todo = [j for j in jobs if j.rel not in sidecars]
    if sidecars:
        logger.info("resuming: %d of %d shard(s) already complete in %s", len(sidecars), len(jobs), out_path)
    reused_images = sum(len(j.samples) for j in jobs if j.rel in sidecars)
    with tqdm(total=len(scan.records), initial=reused_images, desc="sharding", unit="img",
              disable=not progress, smoothing=0.1) as bar:  # fmt: skip
        sidecars.update(run_jobs(todo, workers, bar))

    manifest = build_manifest(scan, jobs, sidecars, seed=seed, max_count=max_count, max_size=size_limit, verify=verify)
    manifest["layout"] = layout  # how `src` was read; the loader does not need it, a reader of the set may
    if not manifest["shards"]:
        raise DataError(
            f"no readable images under {scan.root} ({manifest['skipped']['unreadable']} unreadable); "
            f"nothing usable was written to {out_path}; see the log for the reasons"
        )
    warn_about(manifest)
    atomic_write_json(out_path / MANIFEST_NAME, manifest)
    logger.info(
        "wrote %d shard(s) (%d kept from an earlier run), %d images to %s",
        len(todo), len(jobs) - len(todo), sum(e["count"] for e in manifest["shards"]), out_path,
    )  # fmt: skip
    return ShardReport(manifest=manifest, out=out_path, written=len(todo), reused=len(jobs) - len(todo))
