"""The directories a run writes, made and checked before the expensive set-up, with one-line errors.

`ensure_dir` turns what the OS says about a directory that cannot be one (a regular file in its
place or above it, a read-only filesystem, no permission) into a ConfigError naming the config key
and the path; `os_reason` is the short reason an OSError gives, for such messages.
"""

from __future__ import annotations

import errno
from pathlib import Path

from ds_trainer.errors import ConfigError


def os_reason(exc: OSError) -> str:
    """`No space left on device`, `Read-only file system`, ...: the OS's words, without the path."""
    return exc.strerror or type(exc).__name__


def ensure_dir(path: str | Path, key: str) -> Path:
    """`path` as an existing directory (made if missing); a ConfigError naming `key` if it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} {path} is a file, not a directory: set {key} to a directory (or move the file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        above = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise ConfigError(f"{key} {path} cannot be made: {above} is a file, not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{key} {path} cannot be made ({os_reason(exc)}): {fix(key)}") from None
    return path


def unwritable(path: Path, key: str, exc: OSError) -> ConfigError:
    """The error for a directory the run cannot write into (read-only, no permission, no space)."""
    if exc.errno == errno.ENOSPC:
        return ConfigError(f"{key} {path} has no space left: free space there, or {fix(key)}")
    return ConfigError(f"{key} {path} is not writable ({os_reason(exc)}): {fix(key)}")


def fix(key: str) -> str:
    return f"give {key} a directory this user can write (--set {key}=DIR)"
