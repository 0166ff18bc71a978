"""The console and train.log: which ranks speak, at which level, and whether tqdm bars are drawn."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

_CONSOLE = "ds_trainer.console"
# deepspeed.utils.logging's logger: its own handler writes to stdout, on every rank, in its own format.
_DEEPSPEED = "DeepSpeed"
_OFF_CONSOLE = "ds_trainer_off_console"  # set on a record that belongs in train.log but not on the console


def for_console(record: logging.LogRecord) -> bool:
    """The filter of every console handler: drops the records marked for the log only."""
    return not getattr(record, _OFF_CONSOLE, False)


class _ToOurHandlers(logging.Filter):
    """On DeepSpeed's logger: hand each record to ds_trainer's handlers instead of DeepSpeed's own.

    So DeepSpeed's lines land in train.log with the rank and level, and stdout keeps what the
    command prints ("Setting accelerator to CPU" before `ds-config`'s JSON made it invalid).
    Below ERROR they stay off the console unless `to_console` (--debug).
    """

    def __init__(self, to_console: bool) -> None:
        super().__init__()
        self.to_console = to_console

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.to_console and record.levelno < logging.ERROR:
            setattr(record, _OFF_CONSOLE, True)
        logging.getLogger("ds_trainer.deepspeed").handle(record)
        return False  # not DeepSpeed's own stdout handler


def route_deepspeed_logs(debug: bool) -> None:
    """Send DeepSpeed's log records through ds_trainer's handlers (idempotent; before or after its import)."""
    ds_logger = logging.getLogger(_DEEPSPEED)
    for old in [f for f in ds_logger.filters if isinstance(f, _ToOurHandlers)]:
        ds_logger.removeFilter(old)
    ds_logger.addFilter(_ToOurHandlers(to_console=debug))


class _RunLog(logging.FileHandler):
    """train.log. A write that fails (a full disk) is said once, in one line, and the file is given up:
    the console goes on, and the error that stops the run (if any) is the one reported."""

    def handleError(self, record: logging.LogRecord) -> None:
        if getattr(self, "_given_up", False):
            return
        self._given_up = True
        exc = sys.exc_info()[1]
        reason = getattr(exc, "strerror", None) or exc
        print(f"ds-trainer: cannot write {self.baseFilename} ({reason}); train.log stops here", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_given_up", False):
            super().emit(record)


class _HeldLines(logging.handlers.BufferingHandler):
    """train.log's lines before the run's locks are held: kept, and written once they are.

    A run refused because another one holds its run_dir never appends to that run's train.log.
    Only the newest `capacity` lines are kept (a first launch's op builds are the bulk).
    """

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        if len(self.buffer) > self.capacity:
            del self.buffer[0]
        return False


def configure_logging(
    rank: int, run_dir: str | Path | None, debug: bool | None = None, hold_file: bool = False
) -> None:
    """Rank 0 by default, all ranks at debug.

    Normally rank 0 prints the seed's console lines and writes everything to train.log, while
    other ranks only speak up for warnings (so a failing rank 1 is still heard without eight
    copies of every line). At debug level every rank logs DEBUG to its console and train.log,
    because a hang or a mismatch between ranks can only be diagnosed from all of them.

    `debug=None` keeps the level an earlier call chose (the CLI's --debug survives the Trainer's
    own call for its run directory).

    `hold_file`: train.log's lines are held in memory until the next call, which writes them (call
    it again once the run's directories are locked: see run_lock.RunLocks).
    """
    root = logging.getLogger("ds_trainer")
    if debug is not None:
        root.setLevel(logging.DEBUG if debug else logging.INFO)
    elif root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.propagate = False
    verbose = root.level <= logging.DEBUG
    held: list[logging.LogRecord] = []
    for handler in list(root.handlers):
        if getattr(handler, "_ds_trainer", False):
            root.removeHandler(handler)
            if isinstance(handler, _HeldLines):
                held = list(handler.buffer)
            handler.close()
    handlers: list[logging.Handler] = []
    console_handler = logging.StreamHandler(sys.stdout)
    # Rank 0's console keeps the seed's bare lines; other ranks say who they are.
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console_handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    console_handler.addFilter(for_console)
    if verbose:
        console_handler.setLevel(logging.DEBUG)
    else:
        console_handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers.append(console_handler)
    file_level = logging.DEBUG if rank == 0 or verbose else logging.WARNING
    if run_dir is not None and hold_file:
        holder = _HeldLines(capacity=20000)
        holder.setLevel(file_level)
        handlers.append(holder)
    elif run_dir is not None:
        from ds_trainer.run_dirs import ensure_dir, unwritable

        path = ensure_dir(run_dir, "logging.run_dir") / "train.log"
        try:  # append mode: every rank shares the one file, each line tagged with its rank
            file_handler = _RunLog(path)
        except OSError as exc:
            raise unwritable(path.parent, "logging.run_dir", exc) from None
        file_handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"))
        file_handler.setLevel(file_level)
        for record in held:
            if record.levelno >= file_level:
                file_handler.handle(record)
        handlers.append(file_handler)
    for handler in handlers:
        handler._ds_trainer = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def console() -> logging.Logger:
    """The logger of the seed's bare console lines (`Train Loss: ...`)."""
    return logging.getLogger(_CONSOLE)


def progress_mode(is_main: bool, setting: str) -> str:
    """How rank 0 shows progress within an epoch: `bar` (tqdm), `lines` (plain lines) or `off`.

    tqdm draws on stderr. Under a scheduler, nohup or CI that is a file, where a bar's carriage
    returns become thousands of junk lines, so `auto` prints a plain progress line now and then
    instead (hooks.ProgressLines); `on` draws the bar anyway, `off` shows neither. Other ranks: off.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"progress_bar must be auto, on or off, not {setting!r}")
    if not is_main or setting == "off":
        return "off"
    if setting == "on":
        return "bar"
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return "bar" if isatty and isatty() else "lines"
    except ValueError:  # a closed stream
        return "lines"


def progress_enabled(is_main: bool, setting: str) -> bool:
    """Whether to draw tqdm bars (see progress_mode)."""
    return progress_mode(is_main, setting) == "bar"


def duration(seconds: float) -> str:
    """`0:02:10`, `12:05:09`: the elapsed-time format of the console lines."""
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
