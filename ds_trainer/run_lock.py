"""One live run per checkpoint directory.

Two runs writing the same `checkpoint_dir` overwrite each other's tags and `latest`. The first run
holds `<checkpoint_dir>/.ds_trainer.lock` (host, PID, start time); a second one is refused at start.
A lock whose holder is gone is taken over with a warning: on the same host when its PID is dead,
on another host (a requeued Slurm job lands anywhere) when the holder stopped refreshing it for
`stale_after_s`. The holder refreshes it at most once a minute from the step loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ds_trainer.errors import CheckpointError

log = logging.getLogger(__name__)

LOCK_NAME = ".ds_trainer.lock"
REFRESH_S = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DirLock:
    def __init__(self, directory: str | Path, stale_after_s: float = 600.0) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.held = False
        self._refreshed = 0.0

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}  # unreadable: half-written by a holder that died; treated as stale below

    def _is_stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None when it may be alive."""
        if not holder:
            return "the lock file is unreadable"
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            return None if pid > 0 and _pid_alive(pid) else f"process {pid} on this host is gone"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        if age > self.stale_after_s:
            return f"host {holder.get('host')} has not refreshed it for {age:.0f} s"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile: try again
                why = self._is_stale(holder)
                if why is None:
                    raise CheckpointError(
                        f"checkpoint_dir {self.path.parent} is in use by a live run (host {holder.get('host')}, "
                        f"PID {holder.get('pid')}, since {holder.get('started')}); give this run another "
                        f"training.checkpoint_dir, or stop that one (a lock of a dead run is taken over by itself)"
                    ) from None
                log.warning("taking over the lock of %s: %s (holder: %s)", self.path.parent, why, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            self._refreshed = time.monotonic()
            return
        raise CheckpointError(f"could not take the lock {self.path}: other runs keep taking it")

    def refresh(self) -> None:
        """Touch the lock (at most once a minute), so other hosts see this run is alive."""
        if self.held and time.monotonic() - self._refreshed >= REFRESH_S:
            self._refreshed = time.monotonic()
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("the lock %s was removed by someone else while this run held it", self.path)

    def release(self) -> None:
        if not self.held:
            return
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False


@contextlib.contextmanager
def held_by_rank0(directory: str | Path, is_main: bool, world_size: int) -> Iterator[DirLock | None]:
    """Collective: rank 0 takes `directory`'s lock for the block; every rank learns whether it could.

    Yields the lock on rank 0 (None elsewhere); it is released however the block ends.
    """
    from ds_trainer.metrics import gather_objects

    lock, refusal = None, None
    if is_main:
        lock = DirLock(directory)
        try:
            lock.acquire()
        except CheckpointError as exc:
            lock, refusal = None, str(exc)
    if world_size > 1:
        refusal = gather_objects([refusal])[0]
    if refusal is not None:
        raise CheckpointError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
