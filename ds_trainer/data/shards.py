"""GenImage folder tree -> WebDataset tar shards + manifest.json, and reading the manifest back.

Source layout (GenImage): <src>/<generator>/{train,val}/{ai,nature}/<image files>.
Output layout: <out>/<generator>/<split>/shard-000000.tar ... and <out>/manifest.json.
The manifest is the only thing the streaming loader trusts for sample counts, which is what
lets every rank compute the same epoch length without talking to the others.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ds_trainer.errors import DataError

logger = logging.getLogger(__name__)

FORMAT_NAME = "ds_trainer.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
LABELS = {"ai": 1, "nature": 0}
LABEL_NAMES = {v: k for k, v in LABELS.items()}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# readers (ours, wds.decode) dispatch on the member extension; one spelling per format
_EXT_KEY = {"jpeg": "jpg"}
IMAGE_KEYS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS) | {"jpg"}

_HOW_TO_MAKE = "run `ds-trainer shard --src /path/to/GenImage --out <dir>` or `ds-trainer demo-data`"
_LAYOUT = "<src>/<generator>/{train,val}/{ai,nature}/<images>"


@dataclass(frozen=True)
class ImageRecord:
    """One image of a GenImage tree; label 1 = ai (generated), 0 = nature (real)."""

    path: Path
    generator: str
    split: str
    label: int


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
        if not picked:
            present = sorted({f"{s.generator}/{s.split}" for s in self.shards})
            raise DataError(
                f"no '{split}' shards for {', '.join(sorted(wanted))} in {self.root}; "
                f"it has: {', '.join(present) or 'nothing'}"
            )
        return picked


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if not names:
        return "nothing"
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")


def _scan(
    src: str | Path, generators: list[str] | None = None
) -> tuple[list[ImageRecord], Counter[str]]:
    """scan_genimage plus the count of skipped (non-image) files per generator."""
    root = Path(src)
    if not root.is_dir():
        raise DataError(f"GenImage folder {root} does not exist; expected the layout {_LAYOUT}")
    found = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / s).is_dir() for s in SPLITS)
    )
    if not found:
        raise DataError(
            f"no generator folders in {root} (expected {_LAYOUT}); it contains: {_listing(root)}"
        )
    if generators is not None:
        unknown = sorted(set(generators) - set(found))
        if unknown:
            raise DataError(
                f"generator(s) {', '.join(unknown)} not found in {root}; "
                f"available: {', '.join(found)}"
            )
        found = [g for g in found if g in set(generators)]

    records: list[ImageRecord] = []
    skipped: Counter[str] = Counter()
    for gen in found:
        for split in SPLITS:
            split_dir = root / gen / split
            if not split_dir.is_dir():
                continue
            for class_dir in sorted(split_dir.iterdir()):
                label = LABELS.get(class_dir.name.lower())
                if not class_dir.is_dir() or label is None:
                    if not class_dir.name.startswith("."):
                        logger.warning("ignoring %s: expected only ai/ and nature/ there", class_dir)
                    continue
                # rglob: some GenImage mirrors nest class folders one level deeper
                for path in sorted(class_dir.rglob("*")):
                    if not path.is_file():
                        continue
                    if _is_image(path) and not path.name.startswith("."):
                        records.append(ImageRecord(path, gen, split, label))
                    else:
                        skipped[gen] += 1
    if not records:
        raise DataError(f"no images found under {root} for {', '.join(found)} (layout {_LAYOUT})")
    if skipped:
        logger.info("skipped %d non-image file(s) under %s", sum(skipped.values()), root)
    return records, skipped


def scan_genimage(src: str | Path, generators: list[str] | None = None) -> list[ImageRecord]:
    """List the images of a GenImage tree (sorted, so the result is reproducible)."""
    return _scan(src, generators)[0]


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


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _image_size(data: bytes, path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as exc:  # PIL raises many types for broken files
        logger.warning("skipping unreadable image %s: %s", path, exc)
        return None


class _ShardSeries:
    """Streams the samples of one generator/split into shard-%06d.tar files of max_count.

    Streaming (rather than collecting a shard in memory) keeps memory flat for GenImage's
    large PNGs; each tar is written under a .tmp name and renamed when complete.
    """

    def __init__(self, out: Path, src: Path, gen: str, split: str, key_prefix: str, max_count: int):
        self.out, self.src, self.gen, self.split = out, src, gen, split
        self.key_prefix, self.max_count = key_prefix, max_count
        self.entries: list[dict[str, Any]] = []
        self.total = 0
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._count = self._ai = 0

    def add(self, rec: ImageRecord, data: bytes, width: int, height: int) -> None:
        if self._writer is None:
            rel = self._rel(len(self.entries))
            self._tmp = self.out / (rel + ".tmp")
            # fixed mtime: the same tree and seed give byte-identical shards
            self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)
        ext = rec.path.suffix.lower().lstrip(".")
        meta = {
            "generator": rec.generator,
            "split": rec.split,
            "label": rec.label,
            "path": rec.path.relative_to(self.src).as_posix(),
            "width": width,
            "height": height,
        }
        self._writer.write(
            {
                "__key__": f"{self.key_prefix}-{self.total:07d}",
                _EXT_KEY.get(ext, ext): data,
                "cls": str(rec.label).encode("ascii"),
                "json": json.dumps(meta).encode("utf-8"),
            }
        )
        self.total += 1
        self._count += 1
        self._ai += rec.label
        if self._count == self.max_count:
            self.finish()

    def _rel(self, shard_no: int) -> str:
        return f"{self.gen}/{self.split}/shard-{shard_no:06d}.tar"

    def finish(self) -> None:
        if self._writer is None or self._tmp is None:
            return
        self._writer.close()
        rel = self._rel(len(self.entries))
        os.replace(self._tmp, self.out / rel)
        self.entries.append(
            {
                "path": rel,
                "generator": self.gen,
                "split": self.split,
                "count": self._count,
                "ai": self._ai,
                "nature": self._count - self._ai,
            }
        )
        self._writer, self._tmp = None, None
        self._count = self._ai = 0


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    max_count: int = 1000,
    generators: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write one shard set per generator/split from a GenImage tree; returns the manifest dict.

    Samples of a generator/split are shuffled (deterministically from `seed`) before being cut
    into shards of `max_count`, so every shard mixes ai and nature images. Image bytes are
    stored unchanged: re-encoding would alter exactly the artifacts a detector looks for.
    """
    if max_count < 1:
        raise DataError(f"max_count must be >= 1 (got {max_count})")
    src_path = Path(src).resolve()
    out_path = Path(out)
    records, skipped = _scan(src_path, generators)
    out_path.mkdir(parents=True, exist_ok=True)
    # an old manifest next to half-rewritten shards would give loaders wrong counts, and wrong
    # counts mean unequal epoch lengths across ranks; better no manifest until we are done
    (out_path / MANIFEST_NAME).unlink(missing_ok=True)

    groups: dict[tuple[str, str], list[ImageRecord]] = {}
    for rec in records:
        groups.setdefault((rec.generator, rec.split), []).append(rec)

    safe_names: dict[str, str] = {}
    for gen in sorted({g for g, _ in groups}):
        safe = _safe_key_part(gen)
        if safe in safe_names.values():
            safe = f"{safe}_{len(safe_names)}"
        safe_names[gen] = safe

    counts: dict[str, dict[str, dict[str, int]]] = {}
    shard_entries: list[dict[str, Any]] = []
    unreadable: Counter[str] = Counter()
    bar = tqdm(total=len(records), desc="sharding", unit="img", disable=not progress)
    for (gen, split), recs in sorted(groups.items()):
        order = _mixed_order(recs, random.Random(f"{seed}:{gen}:{split}"), max_count)
        split_dir = out_path / gen / split
        if split_dir.is_dir():
            # a previous run may have written more shards; stale ones must not linger unlisted
            for old in split_dir.glob("shard-*.tar"):
                old.unlink()
        split_dir.mkdir(parents=True, exist_ok=True)

        series = _ShardSeries(out_path, src_path, gen, split, f"{safe_names[gen]}-{split}", max_count)
        label_counts = {"ai": 0, "nature": 0}
        for rec in order:
            data = rec.path.read_bytes()
            size = _image_size(data, rec.path)
            bar.update(1)
            if size is None:
                unreadable[gen] += 1
                continue
            series.add(rec, data, *size)
            label_counts[LABEL_NAMES[rec.label]] += 1
        series.finish()
        shard_entries.extend(series.entries)
        if series.total:
            label_counts["total"] = series.total
            counts.setdefault(gen, {})[split] = label_counts
    bar.close()

    if not shard_entries:
        raise DataError(f"no readable images under {src_path}; nothing was written to {out_path}")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": str(src_path),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "max_count": max_count,
        "labels": dict(LABELS),
        "counts": counts,
        "skipped": {
            "non_image": sum(skipped.values()),
            "unreadable": sum(unreadable.values()),
        },
        "shards": shard_entries,
    }
    _atomic_write_json(out_path / MANIFEST_NAME, manifest)
    logger.info(
        "wrote %d shard(s), %d images to %s",
        len(shard_entries),
        sum(e["count"] for e in shard_entries),
        out_path,
    )
    return manifest


def load_manifest(path: str | Path) -> Manifest:
    """Load `<dir>/manifest.json` (or the given manifest file) and check that its shards exist."""
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
    try:
        for entry in raw["shards"]:
            url = root / entry["path"]
            if not url.is_file():
                missing.append(entry["path"])
            shards.append(
                ShardInfo(
                    url=str(url),
                    path=entry["path"],
                    generator=entry["generator"],
                    split=entry["split"],
                    count=int(entry["count"]),
                    ai=int(entry["ai"]),
                    nature=int(entry["nature"]),
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{manifest_file} has a malformed shard entry ({exc}); re-create the shards") from exc
    if missing:
        raise DataError(
            f"{len(missing)} shard(s) listed in {manifest_file} are missing "
            f"(first: {missing[0]}); re-create the shards"
        )
    generators = sorted({s.generator for s in shards})
    return Manifest(root=root, shards=shards, generators=generators, counts=raw.get("counts", {}), raw=raw)


def rewrite_manifest(out: str | Path, manifest: dict[str, Any]) -> None:
    """Atomically replace `<out>/manifest.json` (used to annotate a manifest after the fact)."""
    _atomic_write_json(Path(out) / MANIFEST_NAME, manifest)
