"""manifest.json: the record of a finished shard set, and the only thing the loader trusts.

Every rank computes the same epoch length from the manifest's counts alone, without talking to
the others, so it is written last (a directory without one is unfinished) and checked when read.
It holds no absolute paths: shard paths are relative to its directory, skipped files to the source.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ds_trainer.data.manifest_checks import check_counts, check_unique, shard_url
from ds_trainer.data.scan import LABELS, SKIP_KINDS, ScanResult
from ds_trainer.data.shard_plan import ShardJob
from ds_trainer.errors import DataError

# the name these lines had before the manifest got its own module: train.log records it
logger = logging.getLogger("ds_trainer.data.shards")

FORMAT_NAME = "ds_trainer.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_HOW_TO_MAKE = "run `ds-trainer shard --src /path/to/GenImage --out <dir>` or `ds-trainer demo-data`"


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard as listed in the manifest; `url` is absolute, `path` relative to the root."""

    url: str
    path: str
    generator: str
    split: str
    count: int
    ai: int
    nature: int


@dataclass
class Manifest:
    """A loaded manifest.json; `select` picks the shards a loader should stream."""

    root: Path
    shards: list[ShardInfo]
    generators: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self.shards})

    def select(self, split: str, generators: list[str] | None = None) -> list[ShardInfo]:
        """Shards of one split, optionally only some generators, in manifest order."""
        if generators is not None:
            unknown = sorted(set(generators) - set(self.generators))
            if unknown:
                raise DataError(
                    f"generator(s) {', '.join(unknown)} not in shard set {self.root}; "
                    f"it has: {', '.join(self.generators)}"
                )
        wanted = set(generators) if generators is not None else set(self.generators)
        picked = [s for s in self.shards if s.split == split and s.generator in wanted]
        if not self.shards:
            raise DataError(f"{self.root}/manifest.json lists no shards; re-create them with ds-trainer shard")
        if not picked:
            present = sorted({f"{s.generator}/{s.split}" for s in self.shards})
            raise DataError(
                f"no '{split}' shards for {', '.join(sorted(wanted))} in {self.root}; "
                f"it has: {', '.join(present) or 'nothing'}"
            )
        return picked


def _counts(scan: ScanResult, sidecars: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Per generator/split/label image counts (split folders without images included, as 0) and modes."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    modes: dict[str, dict[str, dict[str, Counter[str]]]] = {}
    for gen, split in sorted(scan.splits):
        counts.setdefault(gen, {})[split] = {"ai": 0, "nature": 0, "total": 0}
        modes.setdefault(gen, {})[split] = {"ai": Counter(), "nature": Counter()}
    for sc in sidecars:
        c = counts[sc["generator"]][sc["split"]]
        c["ai"] += sc["ai"]
        c["nature"] += sc["nature"]
        c["total"] += sc["count"]
        for name, by_mode in sc["modes"].items():
            modes[sc["generator"]][sc["split"]][name].update(by_mode)
    modes_out = {
        g: {s: {name: dict(sorted(c.items())) for name, c in labels.items()} for s, labels in splits.items()}
        for g, splits in modes.items()
    }
    return counts, modes_out


def build_manifest(
    scan: ScanResult, jobs: list[ShardJob], sidecars: dict[str, dict[str, Any]], *,
    seed: int, max_count: int, max_size: int | None, verify: bool,
) -> dict[str, Any]:  # fmt: skip
    ordered = [sidecars[j.rel] for j in jobs]
    counts, modes = _counts(scan, ordered)
    skipped_files = sorted([*scan.skipped, *(s for sc in ordered for s in sc["skipped"])], key=lambda s: s["path"])
    kinds = Counter(s["kind"] for s in skipped_files)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        # the source folder's name only: a manifest travels with its shards and holds no absolute paths
        "source": scan.root.name,
        "follow_symlinks": scan.follow_symlinks,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "max_count": max_count,
        "max_size": max_size,
        "verified": verify,
        "labels": dict(LABELS),
        "counts": counts,
        "modes": modes,
        "skipped": {**{k: kinds.get(k, 0) for k in SKIP_KINDS}, "files": skipped_files},
        "shards": [
            {k: sc[k] for k in ("path", "generator", "split", "count", "ai", "nature", "bytes")}
            for sc in ordered
            if sc["count"] > 0
        ],
    }


def warn_about(manifest: dict[str, Any]) -> None:
    """Log what a user should look at: empty or one-class splits, and every unreadable file."""
    for gen, splits in manifest["counts"].items():
        for split, c in splits.items():
            if c["total"] == 0:
                logger.warning("%s/%s: no usable images (empty split folder?)", gen, split)
            elif not c["ai"] or not c["nature"]:
                missing = "ai" if not c["ai"] else "nature"
                logger.warning("%s/%s: no %s images, only one class", gen, split, missing)
    unreadable = [s for s in manifest["skipped"]["files"] if s["kind"] == "unreadable"]
    for s in unreadable[:20]:
        logger.warning("skipped unreadable %s: %s", s["path"], s["reason"])
    if len(unreadable) > 20:
        logger.warning("... and %d more unreadable file(s); all are listed in manifest.json", len(unreadable) - 20)


def summary_line(manifest: dict[str, Any]) -> str:
    """One line with images per generator/split/label and the skipped files, for the CLI."""
    parts = []
    for gen, splits in manifest["counts"].items():
        for split, c in splits.items():
            empty = " (empty)" if c["total"] == 0 else ""
            parts.append(f"{gen}/{split} ai={c['ai']} nature={c['nature']}{empty}")
    skipped = manifest["skipped"]
    total = sum(s["count"] for s in manifest["shards"])
    links = "".join(
        f", {skipped[kind]} {what}" for kind, what in (("symlink_outside_src", "symlink(s) outside --src"),
                                                       ("symlink_loop", "symlink loop(s)")) if skipped.get(kind)
    )  # fmt: skip
    return (
        f"{total} images in {len(manifest['shards'])} shards; " + ", ".join(parts)
        + f"; skipped: {skipped['unreadable']} unreadable, {skipped['non_image']} non-image, "
        f"{skipped['outside_layout']} outside layout{links} (listed in manifest.json)"
    )  # fmt: skip


def load_manifest(path: str | Path) -> Manifest:
    """Load `<dir>/manifest.json` (or the given manifest file) and check its shard entries (manifest_checks).

    Missing shards are warned about (their samples count as bad); a path leading outside the shard
    folder, an impossible count or a shard listed twice is refused as a DataError naming the entry.
    """
    p = Path(path)
    manifest_file = p / MANIFEST_NAME if p.is_dir() or not p.suffix else p
    root = manifest_file.parent
    if not root.is_dir():
        raise DataError(f"shard directory {root} does not exist; {_HOW_TO_MAKE}")
    if not manifest_file.is_file():
        raise DataError(f"no {MANIFEST_NAME} in {root}; {_HOW_TO_MAKE}")
    try:
        raw = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest_file} is not valid JSON ({exc}); re-create the shards") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DataError(f"{manifest_file} is not a ds_trainer shard manifest; re-create the shards")
    if raw.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{manifest_file} has format version {raw.get('version')}, this ds_trainer reads "
            f"version {FORMAT_VERSION}; re-create the shards"
        )
    root = root.resolve()
    shards: list[ShardInfo] = []
    missing: list[str] = []
    if not isinstance(raw.get("shards"), list):
        raise DataError(f"{manifest_file} has no list of shards; re-create the shards")
    try:
        for i, entry in enumerate(raw["shards"]):
            if not isinstance(entry, dict):
                raise TypeError(f"shards[{i}] is not an object")
            url = shard_url(manifest_file, i, entry.get("path"))
            check_counts(manifest_file, i, entry, url, raw.get("max_count"))
            if not isinstance(entry["generator"], str) or not isinstance(entry["split"], str):
                raise TypeError(f"shards[{i}]: generator and split must be strings")
            if not os.path.isfile(url):
                missing.append(entry["path"])
            shards.append(
                ShardInfo(
                    url=url,
                    path=entry["path"],
                    generator=entry["generator"],
                    split=entry["split"],
                    count=entry["count"],
                    ai=entry["ai"],
                    nature=entry["nature"],
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{manifest_file} has a malformed shard entry ({exc}); re-create the shards") from exc
    check_unique(manifest_file, [s.url for s in shards], [s.path for s in shards])
    if missing and len(missing) == len(shards):
        raise DataError(f"all {len(missing)} shards listed in {manifest_file} are missing; re-create the shards")
    if missing:
        # The loader counts their samples as bad: data.max_bad_fraction decides whether the run goes on.
        logger.warning(
            "%d of %d shard(s) listed in %s are missing (first: %s); their samples count as bad. "
            "Re-create the shards to get them back", len(missing), len(shards), manifest_file, ", ".join(missing[:3]),
        )  # fmt: skip
    generators = sorted({s.generator for s in shards})
    return Manifest(root=root, shards=shards, generators=generators, counts=raw.get("counts", {}), raw=raw)


def rewrite_manifest(out: str | Path, manifest: dict[str, Any]) -> None:
    """Atomically replace `<out>/manifest.json` (used to annotate a manifest after the fact)."""
    atomic_write_json(Path(out) / MANIFEST_NAME, manifest)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
