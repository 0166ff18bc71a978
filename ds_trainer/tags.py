"""A checkpoint tag is a plain name inside its checkpoint directory, never a path.

A tag comes from the user (`--tag`) or from a file (`checkpoint_dir/latest`), and DeepSpeed unpickles
what it names, so it is checked before anything is opened: `latest` holding `/abs/x` or `../x`, or
`--tag ../other/epoch_1`, would otherwise load files from anywhere on the machine. A tag directory
may be a symbolic link to another tag of the same directory (`best -> epoch_3`), never outside it.
"""

from __future__ import annotations

from pathlib import Path

from ds_trainer.errors import CheckpointError

LATEST = "latest"
NAME_MAX = 255  # bytes in one path component on Linux filesystems
_LATEST_READ = 4096  # a tag name fits; a huge `latest` is not read whole


def _shown(tag: str) -> str:
    return repr(tag if len(tag) <= 60 else tag[:57] + "...")


def check_name(tag: str, where: str) -> str:
    """`tag` if it is a plain name (epoch_3, best, step_40); CheckpointError naming `where` otherwise."""
    why = None
    if not tag:
        why = "is empty"
    elif tag in (".", ".."):
        why = "is not a name"
    elif "/" in tag or "\\" in tag:
        why = "is an absolute path" if tag.startswith(("/", "\\")) else "holds a path separator"
    elif "\0" in tag or any(ord(c) < 32 for c in tag):
        why = "holds control characters"
    elif len(tag.encode("utf-8", "surrogateescape")) > NAME_MAX:
        why = f"is longer than {NAME_MAX} bytes"
    if why is not None:
        raise CheckpointError(f"{where}: tag {_shown(tag)} {why}; a tag is a plain name inside the checkpoint "
                              f"directory (epoch_3, best), not a path: {_fix(where)}")  # fmt: skip
    return tag


def _fix(where: str) -> str:
    if where.endswith(LATEST):
        return f"write a tag name into {LATEST}, or delete it (the newest complete tag is then used)"
    return "give the directory that holds the checkpoint as --load-dir"


def tag_dir(checkpoint_dir: Path, tag: str, where: str) -> Path:
    """`checkpoint_dir/tag`, refused unless `tag` is a plain name whose directory stays inside `checkpoint_dir`."""
    path = checkpoint_dir / check_name(tag, where)
    if not stays_inside(checkpoint_dir, path):
        raise CheckpointError(f"{where}: {path} is a symbolic link to {path.resolve()}, outside {checkpoint_dir}; a "
                              f"tag directory stays inside its checkpoint directory: {_fix(where)}")  # fmt: skip
    return path


def stays_inside(checkpoint_dir: Path, path: Path) -> bool:
    """False for a symbolic link leading out of `checkpoint_dir` (only links are followed; nothing is opened)."""
    if not path.is_symlink():
        return True
    return path.resolve().parent == checkpoint_dir.resolve()


def latest_text(checkpoint_dir: Path) -> str | None:
    """What `latest` holds (unchecked: for comparing names, never for opening), or None without one."""
    latest = checkpoint_dir / LATEST
    if not latest.is_file():
        return None
    with open(latest, encoding="utf-8", errors="surrogateescape") as f:
        return f.read(_LATEST_READ).strip()


def read_latest(checkpoint_dir: Path) -> str | None:
    """The tag `latest` names, checked to be a plain name inside `checkpoint_dir`; None without a `latest`."""
    tag = latest_text(checkpoint_dir)
    if tag is not None:
        tag_dir(checkpoint_dir, tag, str(checkpoint_dir / LATEST))
    return tag
