"""Where a result came from: when it was made, from which commit, with which library versions."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import ds_trainer

# what a number depends on besides the code: the trainer itself and the libraries doing the math
VERSIONED = ("torch", "deepspeed", "transformers")


def package_root() -> Path:
    """The folder holding the ds_trainer package: a checkout's root, or site-packages."""
    return Path(ds_trainer.__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs: the commit is a nicety
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD commit, uncommitted changes to tracked files) of the checkout the package runs from;
    (None, None) when it is not one. Only a `.git` right at `root` counts: an installed package
    sits in site-packages, perhaps inside some other repository whose commit says nothing about it."""
    root = package_root() if root is None else root
    if not (root / ".git").exists():
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"ds_trainer": ds_trainer.__version__}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance() -> dict[str, Any]:
    """The `provenance` block of an eval JSON."""
    commit, dirty = git_state()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": package_versions(),
    }
