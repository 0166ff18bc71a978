"""Opening only regular files: a FIFO, device or socket named `x.png` is refused, never read.

Opening a FIFO for reading blocks until a writer comes (forever, in a scan), and reading a device
such as /dev/zero never ends. So a path is checked with os.stat before it is opened, and opened
with O_NONBLOCK (which makes opening a FIFO return at once) and checked again with fstat on what
was actually opened, so a file swapped for a FIFO in between is refused too. Symbolic links are
followed: whoever calls decides first whether the place a link leads to may be read (`shard`
confines links to --src; `predict` reads the files its user names, wherever their links lead).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """The path exists but is no regular file; nothing was read from it. `kind` says what it is."""

    def __init__(self, path: str | Path, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file; not read")
        self.kind = kind


def kind_of(mode: int) -> str | None:
    """None for a regular file, else what it is ('a FIFO (named pipe)', 'a directory', ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str | Path, mode: int) -> None:
    kind = kind_of(mode)
    if kind is not None:
        raise NotRegularFile(path, kind)


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for binary reading, or NotRegularFile (an OSError) when it is no regular file."""
    _refuse(path, os.stat(path).st_mode)  # before opening: opening some devices has effects
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse(path, os.fstat(fd).st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path) -> bytes:
    """All bytes of the regular file `path` (NotRegularFile for anything else)."""
    with open_regular(path) as f:
        return f.read()
