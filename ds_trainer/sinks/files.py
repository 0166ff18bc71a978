"""The run directory's own record: the seed's console lines, metrics.jsonl and steps.jsonl.

Every jsonl line is written whole or not at all: one write of the encoded line into an unbuffered
file, and a write that fails (a full disk) cuts the file back to where the line began, then stops
the run with one line naming the file (a DsTrainerError). Rewriting a file (a resume's rewind,
config.yaml) goes through a temporary and a rename, so the old content stays until the new is whole.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any

from ds_trainer.errors import DsTrainerError
from ds_trainer.run_dirs import os_reason
from ds_trainer.sinks.base import Sink, log
from ds_trainer.sinks.logs import console, duration


def write_error(path: Path, exc: OSError) -> DsTrainerError:
    """A file of the run directory could not be written (a full disk, a read-only filesystem): exit code 1."""
    kept = " (it ends at its last whole line)" if path.suffix == ".jsonl" else ""
    if exc.errno == errno.ENOSPC:
        why = f"no space left on the device of {path.parent} while writing {path.name}{kept}"
    else:
        why = f"cannot write {path} ({os_reason(exc)}){kept}"
    return DsTrainerError(
        f"{why}: free space or fix it, then resume from the last checkpoint (ds-trainer train --load-dir "
        "<checkpoint_dir>), or set logging.run_dir elsewhere"
    )


def append_whole_line(f: IO[bytes], path: Path, line: str) -> None:
    """Append `line` to the unbuffered binary file `f` whole, or leave the file as it was and raise DsTrainerError."""
    data = line.encode()
    start = f.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:  # a short write (the disk filling up) is continued, and fails on the next call
            written = f.write(view)
            if not written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
    except OSError as exc:
        try:
            f.truncate(start)
        except OSError:
            log.error("could not cut %s back to its last whole line at byte %d", path, start)
        raise write_error(path, exc) from exc


def replace_whole(path: Path, text: str) -> None:
    """`path` now holds `text`, or (on an OSError) still what it held, and DsTrainerError is raised."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc


def _clean(value: Any) -> Any:
    # JSON has no NaN; a metric that cannot be computed (AUC of one class) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _row_value(line: str, key: str) -> float:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return math.inf  # a line cut short by a crash: drop it
    try:
        return float(row.get(key, -math.inf))  # keyless rows are kept
    except (TypeError, ValueError, AttributeError):
        return -math.inf


class FileSink(Sink):
    """Console lines like the seed's, metrics.jsonl per epoch, steps.jsonl per logged step.

    `run_dir=None` prints and writes no file. Unlike the other backends this one keeps recording
    after close() (a Trainer may evaluate after training): each line then opens the file itself.
    The epoch line names the epoch (of `num_epochs`, when given), its optimizer step and the time
    since this sink was made (the run's start).
    """

    def __init__(self, run_dir: Path | None, num_epochs: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self.steps_path = run_dir / "steps.jsonl" if run_dir is not None else None
        self.num_epochs = num_epochs
        self._started = time.monotonic()
        self._steps_file: IO[bytes] | None = None
        self._closed = False

    def step(self, global_step: int, scalars: dict[str, float]) -> None:
        """One line appended to steps.jsonl; no flush beyond the line buffer."""
        if self.steps_path is None:
            return
        line = {
            "step": int(global_step),
            "time": round(time.time(), 3),  # wall clock: time to first step, step rates
            **{k: _clean(float(v)) for k, v in scalars.items()},
        }
        self._append_step(json.dumps(line) + "\n")

    def _append_step(self, line: str) -> None:
        # Kept open while the sinks are live; unbuffered, so a reader (or a crash) sees every
        # finished line, and never part of one.
        assert self.steps_path is not None
        if self._steps_file is None and not self._closed:
            self._steps_file = self._open(self.steps_path)
        if self._steps_file is not None:
            append_whole_line(self._steps_file, self.steps_path, line)
            return
        self._append(self.steps_path, line)

    @staticmethod
    def _open(path: Path) -> IO[bytes]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path.open("ab", buffering=0)
        except OSError as exc:
            raise write_error(path, exc) from exc

    def _append(self, path: Path, line: str) -> None:
        with self._open(path) as f:
            append_whole_line(f, path, line)

    def write(self, row: dict[str, Any]) -> None:
        """The epoch's console line (the seed's numbers, where and when) and one metrics.jsonl row (NaN as null)."""
        parts = []
        if "train_loss" in row:  # a zero-shot run only evaluates
            parts.append(f"Train Loss: {row['train_loss']:.3f}, Train Acc: {row['train_acc']:.3f}")
        if row.get("val_loss") is not None:
            parts.append(
                f"Val Loss: {row['val_loss']:.3f}, Val Acc: {row['val_acc']:.3f}, Val AUC: {row['val_auc']:.3f}"
            )
        if parts:
            console().info("%s | %s", self._where(row), " | ".join(parts))
        if self.path is not None:
            self._append(self.path, json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def _where(self, row: dict[str, Any]) -> str:
        """`Epoch 3/10, step 240, 0:02:10 elapsed`: a Slurm log read later needs no other line to place it."""
        head = "Evaluation" if "train_loss" not in row else f"Epoch {row.get('epoch', '?')}"
        if self.num_epochs is not None and "train_loss" in row:
            head += f"/{self.num_epochs}"
        if "step" in row:
            head += f", step {row['step']}"
        return f"{head}, {duration(time.monotonic() - self._started)} elapsed"

    def rewind(self, epoch: int, step: int) -> None:
        """metrics.jsonl keeps epochs <= `epoch`, steps.jsonl steps <= `step`, and a line cut
        short by a crash goes.

        A run that died after logging an epoch but before its checkpoint was complete would
        otherwise list that epoch twice.
        """
        for path, key, last in ((self.path, "epoch", epoch), (self.steps_path, "step", step)):
            if path is None or not path.is_file():
                continue
            if path == self.steps_path and self._steps_file is not None:
                self._steps_file.close()
                self._steps_file = None
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _row_value(line, key) <= last]
            if len(kept) != len(lines):
                log.info("resume: dropping %d rows after %s %d from %s", len(lines) - len(kept), key, last, path)
                replace_whole(path, "".join(kept))

    def close(self) -> None:
        self._closed = True
        if self._steps_file is not None:
            steps, self._steps_file = self._steps_file, None
            steps.close()


def write_run_config(run_dir: Path, config_yaml: str, ds_config: dict[str, Any]) -> None:
    """The run directory's record of what ran: the config as given, the DeepSpeed JSON as used."""
    from ds_trainer.run_dirs import ensure_dir

    ensure_dir(run_dir, "logging.run_dir")
    replace_whole(run_dir / "config.yaml", config_yaml)
    replace_whole(run_dir / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
