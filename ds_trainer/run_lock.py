"""One live run per checkpoint directory and per run directory.

Two runs writing the same `checkpoint_dir` overwrite each other's tags and `latest`; two writing
the same `run_dir` interleave their metrics.jsonl rows and overwrite config.yaml. The first run
holds `<dir>/.ds_trainer.lock` (host, PID, start time) in both; a second one is refused before it
writes, rewinds or opens anything there (`RunLocks`, taken by `run.run_training` right after the
process group starts, or by the Trainer before its set-up writes). A lock whose holder is gone is
taken over with a warning: on the same host when its PID is dead, on another host (a requeued Slurm
job lands anywhere) when the holder stopped refreshing it for `stale_after_s`; a lock file cut short
(its holder died between creating and writing it) once it is a few seconds old. A lock file that is
valid JSON but no lock record is refused: it is not ours to delete. The holder refreshes its locks
at most once a minute from the step loop.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ds_trainer.errors import CheckpointError
from ds_trainer.run_dirs import ensure_dir, unwritable

log = logging.getLogger(__name__)

LOCK_NAME = ".ds_trainer.lock"
REFRESH_S = 60.0
# A lock file younger than this that holds no JSON yet may be one a live run is writing right now.
BEING_WRITTEN_S = 5.0
_CUT = "cut"  # _holder(): the file holds no (complete) JSON


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_record(holder: Any) -> bool:
    return (
        isinstance(holder, dict)
        and isinstance(holder.get("host"), str)
        and type(holder.get("pid")) is int
        and holder["pid"] > 0
    )


class DirLock:
    """The lock of one directory; `key` names it in messages (`training.checkpoint_dir`, `logging.run_dir`)."""

    def __init__(self, directory: str | Path, stale_after_s: float = 600.0, key: str = "checkpoint_dir") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.key = key
        self.held = False
        self._refreshed = 0.0

    def _holder(self) -> dict[str, Any] | str | None:
        """The holder's record; None: no lock file; `_CUT`: a file without complete JSON."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"the lock {self.path} cannot be read ({getattr(exc, 'strerror', None) or exc}); if no run uses "
                f"{self.path.parent}, delete it"
            ) from None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return _CUT
        if not _is_record(holder):
            shown = text.strip().replace("\n", " ")
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise CheckpointError(
                f"the lock {self.path} is not a ds_trainer lock (it holds {shown}, not host and PID); if no run "
                f"uses {self.path.parent}, delete it"
            )
        return holder

    def _age(self) -> float | None:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _is_stale(self, holder: dict[str, Any] | str) -> str | None:
        """Why the holder is gone, or None when it may be alive."""
        age = self._age()
        if age is None:
            return "it was just released"
        if holder == _CUT:
            return "the lock file was cut short" if age > BEING_WRITTEN_S else None
        assert isinstance(holder, dict)
        if holder["host"] == socket.gethostname():
            pid = holder["pid"]
            return None if _pid_alive(pid) else f"process {pid} on this host is gone"
        if age > self.stale_after_s:
            return f"host {holder['host']} has not refreshed it for {age:.0f} s"
        return None

    def acquire(self) -> None:
        """Take the lock, or raise: CheckpointError when a live run holds it, ConfigError when the
        directory cannot be made or written (a file in its place, read-only, no permission)."""
        directory = ensure_dir(self.path.parent, self.key)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.path.is_dir():
                    raise CheckpointError(f"the lock {self.path} is a directory; if no run uses {directory}, "
                                          "delete it") from None  # fmt: skip
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile: try again
                why = self._is_stale(holder)
                if why is None and holder == _CUT:
                    time.sleep(0.1)  # its writer may be between creating and writing it: see what it writes
                    continue
                if why is None:
                    raise self._in_use(holder) from None
                log.warning("taking over the lock of %s: %s (holder: %s)", directory, why, holder)
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise unwritable(directory, self.key, exc) from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me))
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                raise unwritable(directory, self.key, exc) from None
            self.held = True
            self._refreshed = time.monotonic()
            return

    def _in_use(self, holder: dict[str, Any]) -> CheckpointError:
        who = f"host {holder['host']}, PID {holder['pid']}, since {holder.get('started')}"
        return CheckpointError(
            f"{self.key} {self.path.parent} is in use by a live run ({who}); give this run another "
            f"{self.key}, or stop that one (a lock of a dead run is taken over by itself)"
        )

    def refresh(self) -> None:
        """Touch the lock (at most once a minute), so other hosts see this run is alive."""
        if self.held and time.monotonic() - self._refreshed >= REFRESH_S:
            self._refreshed = time.monotonic()
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("the lock %s was removed by someone else while this run held it", self.path)
            except OSError as exc:
                log.warning("could not refresh the lock %s: %s", self.path, exc)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # gone, or no longer ours to judge: leave it
        if _is_record(holder) and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
            self.path.unlink(missing_ok=True)


class RunLocks:
    """The locks of one run (its checkpoint_dir, its run_dir), taken together by rank 0.

    `acquire` is collective: every rank learns whether rank 0 got all of them, and all raise the same
    error if not (so no rank goes on to write). A directory named twice (run_dir == checkpoint_dir) is
    locked once. Use it as a context manager, or call `release` (idempotent) in a `finally`.
    """

    def __init__(self, directories: dict[str, str | Path], stale_after_s: float = 600.0) -> None:
        self.locks: list[DirLock] = []
        seen: set[Path] = set()
        for key, directory in directories.items():
            where = Path(directory).expanduser().absolute()
            if where not in seen:
                seen.add(where)
                self.locks.append(DirLock(directory, stale_after_s, key=key))

    @classmethod
    def for_run(cls, cfg: Any, checkpoints: bool = True) -> RunLocks:
        """A training run's locks; `checkpoints=False` (a zero-shot evaluation run): its run_dir only."""
        dirs: dict[str, str | Path] = {}
        if checkpoints:
            dirs["training.checkpoint_dir"] = cfg.training.checkpoint_dir
        dirs["logging.run_dir"] = cfg.logging.run_dir
        return cls(dirs)

    @property
    def held(self) -> bool:
        return any(lock.held for lock in self.locks)

    def acquire(self, is_main: bool, world_size: int) -> RunLocks:
        from ds_trainer import errors
        from ds_trainer.metrics import gather_objects

        error: Exception | None = None
        if is_main:
            try:
                for lock in self.locks:
                    lock.acquire()
            except (errors.DsTrainerError, OSError) as exc:  # other ranks must hear of it, not wait for it
                self.release()
                error = exc
        if world_size > 1:
            said = gather_objects([None if error is None else (type(error).__name__, str(error))])[0]
            if error is None and said is not None:
                cls = getattr(errors, said[0], None)
                ok = isinstance(cls, type) and issubclass(cls, errors.DsTrainerError)
                error = (cls if ok else errors.DsTrainerError)(said[1])
        if error is not None:
            raise error
        return self

    def refresh(self) -> None:
        for lock in self.locks:
            lock.refresh()

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    def __enter__(self) -> RunLocks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.release()


class LockHold:
    """A Trainer's hold on its run's locks: the caller's (`run_training` holds them for the whole run),
    or taken by `take` when none were given, before the set-up writes anything, and let go by
    `release_own` (when `train()` ends or the set-up fails; or when the owner is dropped)."""

    def __init__(self, given: RunLocks | None) -> None:
        self.locks, self.own = given, False

    def take(self, cfg: Any, is_main: bool, world_size: int, owner: object) -> None:
        """Collective: rank 0 takes checkpoint_dir's and run_dir's locks if nobody holds them for us."""
        if self.locks is None:
            import weakref

            self.locks, self.own = RunLocks.for_run(cfg).acquire(is_main, world_size), True
            weakref.finalize(owner, self.locks.release)

    def release_own(self) -> None:
        if self.own and self.locks is not None:
            self.locks.release()
            self.locks, self.own = None, False
