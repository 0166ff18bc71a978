"""Scanning a GenImage folder tree: which images it holds, and everything passed over with why.

Source layout (GenImage release): <src>/<generator>/.../{train,val}/.../{ai,nature}/.../<images>,
e.g. stable_diffusion_v_1_4/imagenet_ai_0419_sdv4/train/ai/033_sdv4_00134.png: the split and
class folders are found at any depth below the generator folder.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ds_trainer.data.regular_file import kind_of
from ds_trainer.errors import DataError

# the name these lines had before scanning got its own module: train.log records it
logger = logging.getLogger("ds_trainer.data.shards")

SPLITS = ("train", "val")
LABELS = {"ai": 1, "nature": 0}
LABEL_NAMES = {v: k for k, v in LABELS.items()}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# readers (ours, wds.decode) dispatch on the member extension; one spelling per format
EXT_KEY = {"jpeg": "jpg"}
IMAGE_KEYS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS) | {"jpg"}
# folders that zip tools and desktops leave next to the data; never searched for images
_IGNORED_DIRS = {"__macosx", "$recycle.bin", "@eadir"}
# how deep below a generator folder its train/ or val/ folder may sit
_MAX_SPLIT_DEPTH = 4
# symlink_outside_src: a link leading outside --src, not followed without --follow-symlinks;
# symlink_loop: a link back to itself or to a folder above it (or already scanned in the same role)
SKIP_KINDS = ("non_image", "outside_layout", "unreadable", "symlink_outside_src", "symlink_loop")

_LAYOUT = "<src>/<generator>/[...]/{train,val}/{ai,nature}/<images>"


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


def is_inside(real: str, root_real: str) -> bool:
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
        return not is_inside(os.path.realpath(path), self.root_real)

    def hint(self, root: Path) -> str:
        if not self.unfollowed:
            return ""
        names = ", ".join(Path(p).relative_to(root).as_posix() for p in self.unfollowed[:5])
        more = " ..." if len(self.unfollowed) > 5 else ""
        return (
            f" ({len(self.unfollowed)} symbolic link(s) leading outside {root} were not followed: {names}{more}; "
            "pass --follow-symlinks to read them)"
        )


OUTSIDE_SRC_REASON = "symbolic link to a place outside the source folder; not followed (--follow-symlinks reads it)"


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
        scan.skip(path, "symlink_outside_src", OUTSIDE_SRC_REASON)
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
            kind = kind_of(stat.st_mode)
            if kind is not None:  # a FIFO named x.png would block the reader forever, a device never end
                scan.skip(path, "unreadable", f"{kind}, not a regular file; not read")
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
                scan.skip(Path(entry.path), "symlink_outside_src", OUTSIDE_SRC_REASON)
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
