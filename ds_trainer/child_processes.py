"""Worker processes end with the process that started them, and a signal ends a command in one line.

A pool worker forked by `ds-trainer shard --workers N` used to outlive a SIGTERM to its parent:
the parent died at once (the default action), the workers blocked on a queue nobody would feed,
and they kept the caller's stdout pipe open, so `ds-trainer shard ... | tee log` never ended.
Now:

- the parent turns SIGTERM into `Terminated` (a BaseException, like KeyboardInterrupt, so no
  `except Exception` swallows it) while its pool runs, terminates the workers and exits 143 with
  one line (`cli.main`);
- each worker asks the kernel for SIGKILL when its parent dies (Linux `PR_SET_PDEATHSIG`; a
  watchdog thread polling the parent's pid elsewhere), so even a SIGKILLed parent leaves none;
- workers ignore SIGINT: Ctrl-C reaches the whole process group, and the parent alone decides
  (one "interrupted" line, exit 130) instead of every worker printing a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from types import FrameType

PR_SET_PDEATHSIG = 1
WATCHDOG_S = 1.0


class Terminated(BaseException):
    """SIGTERM arrived while a command ran its own worker processes; exit code 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_S)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when `parent` ends; leave SIGINT to the parent, SIGTERM to the default.

    The SIGTERM handler a forked worker inherits would raise `Terminated` inside it; the default
    ends it at once, which is what the parent's terminate() means.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watchdog").start()
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def terminate_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM every worker of `pool` now (their running tasks are abandoned), without waiting."""
    # ProcessPoolExecutor has no public way to stop running tasks before Python 3.14's terminate_workers().
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.terminate()
