"""The field's other dataset layouts, scanned into the same ScanResult the shard plan and writer consume.

- `genimage` (ds_trainer.data.scan): <src>/<generator>/[...]/{train,val}/{ai,nature}/<images>.
- `binary-folders`, the UnivFD / ForenSynths / Chameleon / AIGCDetectBenchmark shape:
  <src>/[<split>/][<generator>/][<category>/]{0_real,1_fake}/<images>. The generator is the folder
  right below the split (or below <src>); a category folder between it and 0_real/1_fake is merged
  into its generator (ForenSynths' progan/airplane, progan/bird, ... are all `progan`). Where
  0_real/1_fake sit directly in <src> (or in its split folder) the generator is <src>'s own name.
  Splits: train/, val/, test/ at the top of <src> are used as they are; without them everything is
  one split named `val`, which is what `ds-trainer eval` scores by default (data.val_split).
- `list`: a CSV (with a header) or JSONL file of path, label, generator[, split]; paths are relative
  to the list file's folder, labels 0/1, real/fake or nature/ai; without a split column (or with an
  empty cell) an image goes to `val`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ds_trainer.data.scan import (
    OUTSIDE_SRC_REASON,
    ImageRecord,
    ScanResult,
    _is_ignored_dir,
    _is_image,
    _Links,
    _listing,
    _walk,
    is_inside,
    scan_tree,
)
from ds_trainer.errors import ConfigError, DataError

LAYOUTS = ("genimage", "binary-folders", "list")
# the one split a layout without split folders or column is written as: data.val_split's default
EVAL_SPLIT = "val"
TOP_SPLITS = ("train", "val", "test")
BINARY_LABELS = {"0_real": 0, "1_fake": 1}
LIST_LABELS = {"0": 0, "1": 1, "real": 0, "fake": 1, "nature": 0, "ai": 1}
LIST_COLUMNS = ("path", "label", "generator")
_BINARY_LAYOUT = "<src>/[<split>/][<generator>/][<category>/]{0_real,1_fake}/<images>"


def scan_layout(
    layout: str, src: str | Path, generators: list[str] | None = None, *, follow_symlinks: bool = False
) -> ScanResult:
    """The scan of `src` read as `layout` (one of LAYOUTS)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout}: unknown layout; use one of {', '.join(LAYOUTS)}")
    root = Path(src).resolve()
    if layout == "genimage":
        return scan_tree(root, generators, follow_symlinks=follow_symlinks)
    if layout == "binary-folders":
        scan = scan_binary_folders(root, follow_symlinks=follow_symlinks)
    else:
        scan = scan_list(root, follow_symlinks=follow_symlinks)
    return _pick(scan, generators)


def _pick(scan: ScanResult, generators: list[str] | None) -> ScanResult:
    if generators is None:
        return scan
    unknown = sorted(set(generators) - set(scan.generators))
    if unknown:
        raise DataError(f"generator(s) {', '.join(unknown)} not found in {scan.root}; "
                        f"available: {', '.join(scan.generators)}")  # fmt: skip
    keep = set(generators)
    scan.generators = [g for g in scan.generators if g in keep]
    scan.records = [r for r in scan.records if r.generator in keep]
    scan.splits = {(g, s) for g, s in scan.splits if g in keep}
    return scan


def _finish(scan: ScanResult, what: str) -> ScanResult:
    if not scan.records:
        raise DataError(f"no images found in {what}")
    scan.generators = sorted({r.generator for r in scan.records} | {g for g, _ in scan.splits})
    scan.records.sort(key=lambda r: (r.generator, r.split, r.path))
    scan.skipped.sort(key=lambda s: s["path"])
    return scan


# ---------------------------------------------------------------- binary-folders


def _label_dirs(scan: ScanResult, base: Path, links: _Links) -> list[Path]:
    """Every 0_real / 1_fake folder below `base` (none searched below another one), sorted.

    Each folder is looked into once (by device and inode), so links back up cannot loop.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    todo = [base]
    while todo:
        folder = todo.pop()
        try:
            st = folder.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            scan.skip(folder, "unreadable", f"cannot list folder: {exc.strerror or exc}")
            continue
        for e in entries:
            if not e.is_dir():
                if not e.name.startswith(".") and _is_image(Path(e.path)):
                    scan.skip(Path(e.path), "outside_layout", "not below a 0_real/ or 1_fake/ folder")
                continue
            if _is_ignored_dir(e.name):
                continue
            if links.escapes(e.path):
                scan.skip(Path(e.path), "symlink_outside_src", OUTSIDE_SRC_REASON)
            elif e.name.lower() in BINARY_LABELS:
                found.append(Path(e.path))
            else:
                todo.append(Path(e.path))
    return sorted(found)


def scan_binary_folders(root: Path, *, follow_symlinks: bool = False) -> ScanResult:
    """[<split>/][<generator>/][<category>/]{0_real,1_fake}/ (see the module docstring)."""
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; expected the layout {_BINARY_LAYOUT}")
    links = _Links(os.path.realpath(root), follow_symlinks)
    scan = ScanResult(root=root, generators=[], follow_symlinks=follow_symlinks)
    top = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and d.name.lower() in TOP_SPLITS}
    bases = [(name, top[name]) for name in TOP_SPLITS if name in top] or [(EVAL_SPLIT, root)]
    seen: set = set()
    for split, base in bases:
        for label_dir in _label_dirs(scan, base, links):
            parts = label_dir.relative_to(base).parts
            gen = parts[0] if len(parts) > 1 else root.name
            scan.splits.add((gen, split))
            # _walk with the split and label already known collects every image below, links checked
            _walk(scan, label_dir, gen, split, BINARY_LABELS[label_dir.name.lower()], links, seen)
    if not scan.splits:
        raise DataError(
            f"no 0_real/ or 1_fake/ folder in {root} (layout {_BINARY_LAYOUT}); it contains: {_listing(root)}"
            + links.hint(root)
        )
    return _finish(scan, f"the 0_real/1_fake folders under {root}")


# ---------------------------------------------------------------- list


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(row name for messages, fields) per data row of a CSV (header line) or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"list {path} cannot be read ({exc})") from exc
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name} line {n}: not a JSON object ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path.name} line {n}: not a JSON object")
            rows.append((f"{path.name} line {n}", row))
        return rows
    if path.suffix.lower() != ".csv":
        raise DataError(f"list {path}: use a .csv (with a header) or .jsonl file")
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in LIST_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(
            f"{path.name}: header has no {', '.join(missing)} column; it needs path,label,generator[,split]"
        )
    # line numbers as an editor shows them (the header is line 1)
    return [(f"{path.name} line {n}", row) for n, row in enumerate(reader, 2)]


def _name(row_name: str, column: str, value: object) -> str:
    """A generator or split name: it becomes a folder of the shard set, so no path parts."""
    text = "" if value is None else str(value).strip()
    if not text or text in (".", "..") or text.startswith(".") or any(c in text for c in "/\\\0"):
        raise DataError(f"{row_name}: {column} {text!r} is not a name (no slashes, not empty, not starting with '.')")
    return text


def scan_list(list_file: Path, *, follow_symlinks: bool = False) -> ScanResult:
    """A CSV/JSONL list of path, label, generator[, split] (see the module docstring)."""
    if not list_file.is_file():
        raise DataError(f"list file {list_file} does not exist; give a .csv or .jsonl of path,label,generator[,split]")
    root = list_file.parent
    links = _Links(os.path.realpath(root), follow_symlinks)
    scan = ScanResult(root=root, generators=[], follow_symlinks=follow_symlinks)
    listed: set[Path] = set()
    for row_name, row in _rows(list_file):
        missing = [c for c in LIST_COLUMNS if row.get(c) in (None, "")]
        if missing:
            raise DataError(f"{row_name}: no {', '.join(missing)}; every row needs path, label, generator")
        label = LIST_LABELS.get(str(row["label"]).strip().lower())
        if label is None:
            raise DataError(f"{row_name}: label {row['label']!r} is not one of 0/1, real/fake, nature/ai")
        gen = _name(row_name, "generator", row["generator"])
        split = _name(row_name, "split", row["split"]) if row.get("split") not in (None, "") else EVAL_SPLIT
        rel = os.path.normpath(str(row["path"]).strip())
        if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
            raise DataError(
                f"{row_name}: path {row['path']} is outside {root}; paths are relative to the list's folder"
            )
        path = root / rel
        if not path.is_file():
            raise DataError(f"{row_name}: no file {path}")
        if path in listed:
            raise DataError(f"{row_name}: {rel} is listed twice")
        listed.add(path)
        scan.splits.add((gen, split))
        if not follow_symlinks and not is_inside(os.path.realpath(path), links.root_real):
            scan.skip(path, "symlink_outside_src", OUTSIDE_SRC_REASON)
        elif not _is_image(path):
            scan.skip(path, "non_image", f"not an image extension ({path.suffix or 'none'})")
        else:
            st = path.stat()
            scan.records.append(ImageRecord(path, gen, split, label, st.st_size, st.st_mtime_ns))
    return _finish(scan, f"list {list_file}")
