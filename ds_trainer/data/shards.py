"""GenImage folder tree -> WebDataset tar shards + manifest.json, and reading the manifest back.

Source layout (GenImage release): <src>/<generator>/.../{train,val}/.../{ai,nature}/.../<images>,
e.g. stable_diffusion_v_1_4/imagenet_ai_0419_sdv4/train/ai/033_sdv4_00134.png: the split and
class folders are found at any depth below the generator folder.
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
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import webdataset as wds
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from ds_trainer.errors import DataError

logger = logging.getLogger(__name__)

FORMAT_NAME = "ds_trainer.shards"
FORMAT_VERSION = 1
SIDECAR_FORMAT = "ds_trainer.shard"
# bump when what a shard holds for the same plan changes, so old shards are rewritten on resume
SIDECAR_VERSION = 2
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
LABELS = {"ai": 1, "nature": 0}
LABEL_NAMES = {v: k for k, v in LABELS.items()}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# readers (ours, wds.decode) dispatch on the member extension; one spelling per format
_EXT_KEY = {"jpeg": "jpg"}
IMAGE_KEYS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS) | {"jpg"}
# folders that zip tools and desktops leave next to the data; never searched for images
_IGNORED_DIRS = {"__macosx", "$recycle.bin", "@eadir"}
# how deep below a generator folder its train/ or val/ folder may sit
_MAX_SPLIT_DEPTH = 4
# symlink_outside_src: a link leading outside --src, not followed without --follow-symlinks;
# symlink_loop: a link back to itself or to a folder above it (or already scanned in the same role)
SKIP_KINDS = ("non_image", "outside_layout", "unreadable", "symlink_outside_src", "symlink_loop")

_HOW_TO_MAKE = "run `ds-trainer shard --src /path/to/GenImage --out <dir>` or `ds-trainer demo-data`"
_LAYOUT = "<src>/<generator>/[...]/{train,val}/{ai,nature}/<images>"
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


@dataclass(frozen=True)
class ImageRecord:
    """One image of a GenImage tree; label 1 = ai (generated), 0 = nature (real).

    `size`/`mtime_ns` come from the scan; they decide whether a finished shard is still current.
    """

    path: Path
    generator: str
    split: str
    label: int
    size: int = field(default=0, compare=False)
    mtime_ns: int = field(default=0, compare=False)


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


# ---------------------------------------------------------------- scanning


@dataclass
class ScanResult:
    """What a scan found: images, files it passed over (with why), and every split folder seen.

    `splits` includes split folders without any image, so an empty one is reported as 0 rather
    than silently missing from the counts. Skipped paths are relative to `root`.
    """

    root: Path
    generators: list[str]
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    splits: set[tuple[str, str]] = field(default_factory=set)
    follow_symlinks: bool = False

    def skip(self, path: Path, kind: str, reason: str) -> None:
        self.skipped.append({"path": path.relative_to(self.root).as_posix(), "kind": kind, "reason": reason})


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_ignored_dir(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_DIRS


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if not names:
        return "nothing"
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")


def _inside(real: str, root_real: str) -> bool:
    """Whether the resolved path `real` is `root_real` or below it (both from os.path.realpath)."""
    try:
        return os.path.commonpath([real, root_real]) == root_real
    except ValueError:  # different drives (Windows)
        return False


@dataclass
class _Links:
    """Which symbolic links a scan follows: all of them, or only those that stay inside the source.

    A link is judged by where it finally leads (os.path.realpath, so chains of links and `..`
    count), against the real path of the source root. `unfollowed` collects the links that
    finding the generator folders passed over, for the hints in its messages.
    """

    root_real: str
    follow: bool = False
    unfollowed: list[str] = field(default_factory=list)

    def escapes(self, path: str) -> bool:
        """True for a symlink leading outside the source root while such links are not followed."""
        if self.follow or not os.path.islink(path):
            return False
        return not _inside(os.path.realpath(path), self.root_real)

    def hint(self, root: Path) -> str:
        if not self.unfollowed:
            return ""
        names = ", ".join(Path(p).relative_to(root).as_posix() for p in self.unfollowed[:5])
        more = " ..." if len(self.unfollowed) > 5 else ""
        return (
            f" ({len(self.unfollowed)} symbolic link(s) leading outside {root} were not followed: {names}{more}; "
            "pass --follow-symlinks to read them)"
        )


_OUTSIDE_SRC = "symbolic link to a place outside the source folder; not followed (--follow-symlinks reads it)"


def _subdirs(path: Path, links: _Links) -> list[os.DirEntry[str]]:
    """Folders below `path` worth searching; links leading outside the source are noted and passed over."""
    found = []
    try:
        with os.scandir(path) as it:
            for e in it:
                if not e.is_dir() or _is_ignored_dir(e.name):
                    continue
                if links.escapes(e.path):
                    links.unfollowed.append(e.path)
                    continue
                found.append(e)
    except OSError:
        return []
    return sorted(found, key=lambda e: e.name)


def _has_split_dir(path: Path, links: _Links) -> bool:
    """Breadth-first look for a train/ or val/ folder; stops at the first, so it is cheap on big trees.

    Each folder is looked into once, so links back up or many links to one folder cannot blow it up.
    """
    level = [path]
    seen: set[tuple[int, int]] = set()
    for _ in range(_MAX_SPLIT_DEPTH):
        nxt: list[Path] = []
        for folder in level:
            for entry in _subdirs(folder, links):
                if entry.name.lower() in SPLITS:
                    return True
                try:
                    st = entry.stat()
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    nxt.append(Path(entry.path))
        level = nxt
    return False


def _find_generators(root: Path, links: _Links) -> list[str]:
    """Top-level folders that hold a split folder somewhere below; a root that is itself one is an error."""
    if not root.is_dir():
        raise DataError(f"GenImage folder {root} does not exist; expected the layout {_LAYOUT}")
    top = _subdirs(root, links)
    if any(e.name.lower() in SPLITS for e in top):
        raise DataError(
            f"{root} has train/ or val/ directly inside, so it looks like one generator's folder; "
            f"pass its parent as --src (and --generators {root.name} to shard only this one)"
        )
    found = []
    for entry in top:
        before = len(links.unfollowed)
        if _has_split_dir(Path(entry.path), links):
            found.append(entry.name)
        elif len(links.unfollowed) > before:
            logger.warning(
                "ignoring %s: no train/ or val/ folder below it inside %s; %d symbolic link(s) below it lead "
                "outside and were not followed (pass --follow-symlinks to read them)",
                root / entry.name, root, len(links.unfollowed) - before,
            )  # fmt: skip
        else:
            logger.info("ignoring %s: no train/ or val/ folder below it", root / entry.name)
    if not found:
        raise DataError(
            f"no generator folders in {root} (expected {_LAYOUT}); it contains: {_listing(root)}{links.hint(root)}"
        )
    return found


def _check_link(scan: ScanResult, path: Path, links: _Links) -> bool:
    """Whether the walk may go through the symlink `path`; if not, records why it was passed over."""
    if links.escapes(str(path)):
        scan.skip(path, "symlink_outside_src", _OUTSIDE_SRC)
        return False
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            scan.skip(path, "symlink_loop", "symbolic link loop (the link leads back to itself)")
        else:
            scan.skip(path, "unreadable", f"dangling symbolic link: {exc.strerror or exc}")
        return False
    return True


def _walk(
    scan: ScanResult, folder: Path, gen: str, split: str | None, label: int | None,
    links: _Links, seen: set, above: frozenset = frozenset(),
) -> None:  # fmt: skip
    """Collect images below `folder`; `split`/`label` are the nearest train|val and ai|nature above it.

    Symlinked folders inside the source are followed; a folder is walked once per split/label
    (`seen`), and never again below itself (`above`), so link loops and link fans end.
    """
    try:
        st = folder.stat()
    except OSError as exc:
        scan.skip(folder, "unreadable", f"cannot list folder: {exc.strerror or exc}")
        return
    here = (st.st_dev, st.st_ino)
    if here in above:  # a symlink to a folder above it would recurse forever
        scan.skip(folder, "symlink_loop", "symbolic link to a folder above it (a loop); not followed")
        return
    if (here, split, label) in seen:
        scan.skip(folder, "symlink_loop", "symbolic link to a folder already scanned as this split and class")
        return
    seen.add((here, split, label))
    above = above | {here}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        scan.skip(folder, "unreadable", f"cannot list folder: {exc.strerror or exc}")
        return
    for entry in entries:
        path = Path(entry.path)
        # hidden entries are never read, so never followed either; they keep their own skip reason below
        if not entry.name.startswith(".") and entry.is_symlink() and not _check_link(scan, path, links):
            continue
        if entry.is_dir():
            name = entry.name.lower()
            if _is_ignored_dir(entry.name):
                scan.skip(path, "non_image", "hidden or system folder, not searched")
            elif split is None and name in SPLITS:
                scan.splits.add((gen, name))
                _walk(scan, path, gen, name, None, links, seen, above)
            elif split is not None and label is None and name in LABELS:
                _walk(scan, path, gen, split, LABELS[name], links, seen, above)
            else:
                _walk(scan, path, gen, split, label, links, seen, above)
        elif entry.name.startswith("."):
            scan.skip(path, "non_image", "hidden file")
        elif not _is_image(path):
            scan.skip(path, "non_image", f"not an image extension ({path.suffix or 'none'})")
        elif split is None or label is None:
            scan.skip(path, "outside_layout", "not below a {train,val}/{ai,nature}/ folder")
        else:
            try:
                stat = entry.stat()
            except OSError as exc:
                scan.skip(path, "unreadable", f"cannot stat file: {exc.strerror or exc}")
                continue
            scan.records.append(ImageRecord(path, gen, split, label, stat.st_size, stat.st_mtime_ns))


def scan_tree(src: str | Path, generators: list[str] | None = None, *, follow_symlinks: bool = False) -> ScanResult:
    """Walk a GenImage tree: images sorted by path, everything passed over listed with its reason.

    Symbolic links that lead outside `src` (files or folders) are passed over and listed, unless
    `follow_symlinks`; links that stay inside `src` are always followed.
    """
    root = Path(src)
    links = _Links(os.path.realpath(root), follow_symlinks)
    found = _find_generators(root, links)
    if generators is not None:
        unknown = sorted(set(generators) - set(found))
        if unknown:
            raise DataError(
                f"generator(s) {', '.join(unknown)} not found in {root}; available: {', '.join(found)}"
                + links.hint(root)
            )
        found = [g for g in found if g in set(generators)]
    scan = ScanResult(root=root, generators=found, follow_symlinks=follow_symlinks)
    with os.scandir(root) as it:  # a generator folder that is itself a link leading outside
        for entry in it:
            if (generators is None or entry.name in generators) and entry.path in links.unfollowed:
                scan.skip(Path(entry.path), "symlink_outside_src", _OUTSIDE_SRC)
    for gen in found:
        _walk(scan, root / gen, gen, None, None, links, set())
    scan.skipped.sort(key=lambda s: s["path"])
    outside = [s["path"] for s in scan.skipped if s["kind"] == "symlink_outside_src"]
    if outside:
        logger.warning(
            "not following %d symbolic link(s) that lead outside %s: %s%s; pass --follow-symlinks to read them",
            len(outside), root, ", ".join(outside[:5]), " ..." if len(outside) > 5 else "",
        )  # fmt: skip
    if not scan.records:
        unfollowed = f"; {len(outside)} symbolic link(s) leading outside were not followed" if outside else ""
        raise DataError(f"no images found under {root} for {', '.join(found)} (layout {_LAYOUT}){unfollowed}")
    scan.records.sort(key=lambda r: (r.generator, r.split, r.path))
    if scan.skipped:
        logger.info("passed over %d file(s) or folder(s) under %s (listed with the reason in the manifest)",
                    len(scan.skipped), root)  # fmt: skip
    return scan


def _scan(
    src: str | Path, generators: list[str] | None = None, *, follow_symlinks: bool = False
) -> tuple[list[ImageRecord], Counter[str]]:
    """scan_genimage plus the count of passed-over files per generator (kept for older callers)."""
    scan = scan_tree(src, generators, follow_symlinks=follow_symlinks)
    skipped = Counter(s["path"].split("/", 1)[0] for s in scan.skipped)
    return scan.records, skipped


def scan_genimage(
    src: str | Path, generators: list[str] | None = None, *, follow_symlinks: bool = False
) -> list[ImageRecord]:
    """List the images of a GenImage tree (sorted, so the result is reproducible).

    Symbolic links leading outside `src` are passed over unless `follow_symlinks` (see scan_tree).
    """
    return scan_tree(src, generators, follow_symlinks=follow_symlinks).records


# ---------------------------------------------------------------- planning


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


class _Planned(NamedTuple):
    """One sample as planned: a plain tuple, so a pool ships thousands of them cheaply."""

    path: str  # absolute source file
    rel: str  # relative to the source root, recorded in the sample metadata
    label: int
    key: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _ShardJob:
    """Everything a pool worker needs to write one shard, with no reference to shared state."""

    out: str
    rel: str  # <generator>/<split>/shard-NNNNNN.tar
    generator: str
    split: str
    samples: tuple[_Planned, ...]
    digest: str
    verify: bool = True
    # real path of the source root: a file that now resolves outside it is not read (None: read all)
    confine: str | None = None

    @property
    def sidecar_rel(self) -> str:
        return self.rel[: -len(".tar")] + ".json"


def _tar_bytes_estimate(sample: _Planned) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per member, data padded to 512 (json ~ path + 250)."""

    def padded(n: int) -> int:
        return 512 + -(-n // 512) * 512

    return padded(sample.size) + padded(1) + padded(len(sample.rel.encode()) + 250)


_TAR_END = 10240  # end-of-archive blocks, padded to tarfile's record size


def _cut(order: list[_Planned], max_count: int, max_size: int | None) -> Iterator[list[_Planned]]:
    """Consecutive runs of the plan, each within max_count samples and (estimated) max_size bytes.

    A single image larger than max_size still gets a shard of its own rather than failing the run.
    """
    part: list[_Planned] = []
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


def _digest(rel: str, samples: list[_Planned], verify: bool) -> str:
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


def _plan(
    scan: ScanResult, out: Path, seed: int, max_count: int, max_size: int | None, verify: bool = True
) -> list[_ShardJob]:
    """The deterministic shard plan: same tree, seed and limits give the same shards and keys.

    Keys number the samples of a generator/split in planned order, so a shard's keys do not
    depend on which other files turned out unreadable.
    """
    groups: dict[tuple[str, str], list[ImageRecord]] = {}
    for rec in scan.records:
        groups.setdefault((rec.generator, rec.split), []).append(rec)
    prefixes = _key_prefixes([g for g, _ in groups])
    confine = None if scan.follow_symlinks else os.path.realpath(scan.root)
    jobs: list[_ShardJob] = []
    for (gen, split), recs in sorted(groups.items()):
        order = _mixed_order(recs, random.Random(f"{seed}:{gen}:{split}"), max_count)
        planned = [
            _Planned(str(r.path), r.path.relative_to(scan.root).as_posix(), r.label,
                     f"{prefixes[gen]}-{split}-{i:07d}", r.size, r.mtime_ns)
            for i, r in enumerate(order)
        ]  # fmt: skip
        for n, part in enumerate(_cut(planned, max_count, max_size)):
            rel = f"{gen}/{split}/shard-{n:06d}.tar"
            digest = _digest(rel, part, verify)
            jobs.append(_ShardJob(str(out), rel, gen, split, tuple(part), digest, verify, confine))
    return jobs


# ---------------------------------------------------------------- writing one shard (runs in a pool worker)


class _Unreadable(Exception):
    """An image that is not read or does not fully decode; carries the kind and reason recorded in the manifest."""

    def __init__(self, reason: str, kind: str = "unreadable") -> None:
        super().__init__(reason)
        self.kind = kind


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image (unknown format or broken header)"
    # PIL puts object reprs (with memory addresses) into some messages; keep reasons reproducible
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _verify(data: bytes, decode: bool = True) -> dict[str, Any]:
    """Decode every pixel (load(), since verify() passes truncated and corrupt image data).

    Returns width/height/mode/format; any decoding problem raises _Unreadable. Truncated files
    must fail here even if some caller set ImageFile.LOAD_TRUNCATED_IMAGES, so it is forced off.
    decode=False reads the header only (write_shards(verify=False)).
    """
    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(data)) as img:
            if decode:
                img.load()
            return {"width": img.width, "height": img.height, "mode": img.mode, "format": img.format}
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, zlib.error ...)
        raise _Unreadable(_reason(exc)) from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def _read_verified(sample: _Planned, decode: bool = True, confine: str | None = None) -> tuple[bytes, dict[str, Any]]:
    path = sample.path
    if confine is not None:
        # checked again here, not only in the scan: the tree may have changed since (a file replaced
        # by a link leading outside), and the resolved path is what is read
        path = os.path.realpath(path)
        if not _inside(path, confine):
            raise _Unreadable(_OUTSIDE_SRC, "symlink_outside_src")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _Unreadable(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise _Unreadable("empty file (0 bytes)")
    return data, _verify(data, decode)


def _write_one_shard(job: _ShardJob) -> dict[str, Any]:
    """Verify and write one planned shard; returns its sidecar (also written next to the tar).

    The tar is written under a .tmp name and renamed when complete, then the sidecar is written:
    a tar without a matching sidecar is treated as unfinished and rewritten on the next run.
    Image bytes are stored unchanged: re-encoding would alter the artifacts a detector looks for.
    """
    out = Path(job.out)
    final, tmp = out / job.rel, out / (job.rel + ".tmp")
    keys: list[str] = []
    skipped: list[dict[str, str]] = []
    modes: dict[str, Counter[str]] = {"ai": Counter(), "nature": Counter()}
    ai = 0
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # fixed mtime: the same tree and seed give byte-identical shards
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:
            for sample in job.samples:
                try:
                    data, info = _read_verified(sample, job.verify, job.confine)
                except _Unreadable as exc:
                    skipped.append({"path": sample.rel, "kind": exc.kind, "reason": str(exc)})
                    continue
                writer.write(_tar_sample(job, sample, data, info))
                keys.append(sample.key)
                ai += sample.label
                modes[LABEL_NAMES[sample.label]][info["mode"]] += 1
        if keys:
            os.replace(tmp, final)
        else:  # every image unreadable: no empty tar, the sidecar alone records the outcome
            tmp.unlink()
            final.unlink(missing_ok=True)
        sidecar = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "plan": job.digest,
            "path": job.rel,
            "generator": job.generator,
            "split": job.split,
            "count": len(keys),
            "ai": ai,
            "nature": len(keys) - ai,
            "bytes": final.stat().st_size if keys else 0,
            "modes": {name: dict(sorted(c.items())) for name, c in modes.items()},
            "skipped": skipped,
            "keys": keys,
        }
        _atomic_write_json(out / job.sidecar_rel, sidecar)
    except OSError as exc:
        raise DataError(
            f"writing shard {final} failed ({exc}); check free space and permissions in {out} and "
            "re-run the same command: finished shards are kept"
        ) from exc
    return sidecar


def _tar_sample(job: _ShardJob, sample: _Planned, data: bytes, info: dict[str, Any]) -> dict[str, Any]:
    ext = Path(sample.rel).suffix.lower().lstrip(".")
    meta = {
        "generator": job.generator,
        "split": job.split,
        "label": sample.label,
        "path": sample.rel,
        **info,  # width, height, mode (before any RGB conversion), format (as decoded)
    }
    return {
        "__key__": sample.key,
        _EXT_KEY.get(ext, ext): data,
        "cls": str(sample.label).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- resuming and running the plan


def _reusable(job: _ShardJob) -> dict[str, Any] | None:
    """The sidecar of a finished shard written from exactly this plan, else None (rewrite it)."""
    out = Path(job.out)
    try:
        sidecar = json.loads((out / job.sidecar_rel).read_text())
        current = (
            sidecar.get("format") == SIDECAR_FORMAT
            and sidecar.get("version") == SIDECAR_VERSION
            and sidecar.get("plan") == job.digest
        )
        if current and sidecar["count"] > 0:
            current = (out / job.rel).stat().st_size == sidecar["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sidecar if current else None


def _clean_stale(out: Path, dirs: set[tuple[str, str]], jobs: list[_ShardJob]) -> None:
    """Remove temp files and shards that are not in the plan, so nothing unlisted lingers."""
    planned = {j.rel for j in jobs} | {j.sidecar_rel for j in jobs}
    for gen, split in dirs:
        folder = out / gen / split
        if not folder.is_dir():
            continue
        for path in [*folder.glob("shard-*.tmp"), *folder.glob("shard-*.tar"), *folder.glob("shard-*.json")]:
            if path.relative_to(out).as_posix() not in planned:
                path.unlink()


def default_workers() -> int:
    """CPUs this process may use (respects taskset/Slurm affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork on Linux (as torch's DataLoader does): workers start at once, and a caller's script
    # needs no `if __name__ == "__main__"` guard, which spawn/forkserver would require because
    # they re-import the main module. Workers only use PIL and tarfile, never torch's threads.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def _run_jobs(jobs: list[_ShardJob], workers: int, bar: tqdm) -> dict[str, dict[str, Any]]:
    """Write the shards of `jobs`, one per task; `workers` > 1 uses a process pool."""
    done: dict[str, dict[str, Any]] = {}

    def finished(sidecar: dict[str, Any]) -> None:
        done[sidecar["path"]] = sidecar
        bar.update(sidecar["count"] + len(sidecar["skipped"]))
        skipped = sum(len(s["skipped"]) for s in done.values())
        if skipped:
            bar.set_postfix(unreadable=skipped, refresh=False)

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            finished(_write_one_shard(job))
        return done
    pool = _pool(min(workers, len(jobs)))
    try:
        pending: set[Future] = {pool.submit(_write_one_shard, job) for job in jobs}
        while pending:
            ready, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in ready:
                finished(fut.result())  # re-raises a worker's error here
    except BrokenProcessPool as exc:
        raise DataError(
            f"a shard worker died while writing to {jobs[0].out} (out of memory on a huge image?); "
            "re-run with fewer --workers: finished shards are kept"
        ) from exc
    finally:
        # on error or Ctrl-C: drop queued shards; running ones finish or die, the next run redoes them
        pool.shutdown(wait=True, cancel_futures=True)
    return done


# ---------------------------------------------------------------- the manifest


@dataclass
class ShardReport:
    """The outcome of a sharding run: the manifest as written, plus what this run itself did."""

    manifest: dict[str, Any]
    out: Path
    written: int = 0
    reused: int = 0


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


def _build_manifest(
    scan: ScanResult, jobs: list[_ShardJob], sidecars: dict[str, dict[str, Any]], *,
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
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (UTC alias is 3.11+)
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


def _warn_about(manifest: dict[str, Any]) -> None:
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
) -> ShardReport:
    """write_shards, also telling how many shards this run wrote and how many it kept from before."""
    if max_count < 1:
        raise DataError(f"max_count must be >= 1 (got {max_count})")
    size_limit = parse_size(max_size)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be >= 1 (got {workers})")
    out_path = Path(out)
    logger.info("scanning %s", src)
    scan = scan_tree(Path(src).resolve(), generators, follow_symlinks=follow_symlinks)
    logger.info("%d images in %d generator folder(s); %d file(s) passed over", len(scan.records),
                len(scan.generators), len(scan.skipped))  # fmt: skip
    out_path.mkdir(parents=True, exist_ok=True)
    # an old manifest next to half-rewritten shards would give loaders wrong counts, and wrong
    # counts mean unequal epoch lengths across ranks; better no manifest until we are done
    (out_path / MANIFEST_NAME).unlink(missing_ok=True)
    jobs = _plan(scan, out_path, seed, max_count, size_limit, verify)
    _clean_stale(out_path, scan.splits, jobs)

    sidecars = {j.rel: sc for j in jobs if (sc := _reusable(j)) is not None}
    todo = [j for j in jobs if j.rel not in sidecars]
    if sidecars:
        logger.info("resuming: %d of %d shard(s) already complete in %s", len(sidecars), len(jobs), out_path)
    reused_images = sum(len(j.samples) for j in jobs if j.rel in sidecars)
    with tqdm(total=len(scan.records), initial=reused_images, desc="sharding", unit="img",
              disable=not progress, smoothing=0.1) as bar:  # fmt: skip
        sidecars.update(_run_jobs(todo, workers, bar))

    manifest = _build_manifest(
        scan, jobs, sidecars, seed=seed, max_count=max_count, max_size=size_limit, verify=verify
    )
    if not manifest["shards"]:
        raise DataError(
            f"no readable images under {scan.root} ({manifest['skipped']['unreadable']} unreadable); "
            f"nothing usable was written to {out_path}; see the log for the reasons"
        )
    _warn_about(manifest)
    _atomic_write_json(out_path / MANIFEST_NAME, manifest)
    logger.info(
        "wrote %d shard(s) (%d kept from an earlier run), %d images to %s",
        len(todo), len(jobs) - len(todo), sum(e["count"] for e in manifest["shards"]), out_path,
    )  # fmt: skip
    return ShardReport(manifest=manifest, out=out_path, written=len(todo), reused=len(jobs) - len(todo))


def write_shards(src: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Write one shard set per generator/split from a GenImage tree; returns the manifest dict.

    Samples of a generator/split are shuffled (deterministically from `seed`) before being cut
    into shards of at most `max_count` samples and `max_size` bytes (int, or '1GB'), so every
    shard mixes ai and nature images. Every image is fully decoded first, by `workers`
    processes (default: all CPUs); files that do not decode are skipped and listed in the
    manifest. Re-running into the same `out` keeps the shards that are already complete.
    Symbolic links leading outside `src` are skipped and listed unless `follow_symlinks`; links
    that stay inside `src` are followed. The manifest holds no absolute paths: shard paths are
    relative to `out`, skipped files relative to `src`, and `source` is the name of `src`.

    verify=False only checks each file's header (the pre-verification behaviour): for tests of
    the loader's own handling of corrupt samples, never for training data.

    Keywords are shard_genimage's (max_count, max_size, generators, seed, workers, progress,
    verify, follow_symlinks); this returns only its manifest.
    """
    return shard_genimage(src, out, **options).manifest


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
    _atomic_write_json(Path(out) / MANIFEST_NAME, manifest)
