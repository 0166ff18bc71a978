"""Where progress and metrics go: the console (rank 0), train.log and metrics.jsonl.

The Trainer hands each epoch's metrics to `MetricsSinks.write`; it does not know about files.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

_CONSOLE = "ds_trainer.console"


def configure_logging(rank: int, run_dir: str | Path | None, debug: bool | None = None) -> None:
    """Rank 0 prints the seed's console lines; every rank logs with a rank prefix to train.log.

    `debug=None` keeps the level an earlier call chose (the CLI's --debug survives the Trainer's
    own call for its run directory).
    """
    root = logging.getLogger("ds_trainer")
    if debug is not None:
        root.setLevel(logging.DEBUG if debug else logging.INFO)
    elif root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        if getattr(handler, "_ds_trainer", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    # Other ranks only speak up for warnings, so a failing rank 1 is still heard.
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers.append(console)
    if run_dir is not None:
        path = Path(run_dir) / "train.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"))
        # One file for the run: rank 0 writes everything, other ranks only warnings and errors.
        file_handler.setLevel(logging.DEBUG if rank == 0 else logging.WARNING)
        handlers.append(file_handler)
    for handler in handlers:
        handler._ds_trainer = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def console() -> logging.Logger:
    return logging.getLogger(_CONSOLE)


def _clean(value: Any) -> Any:
    # JSON has no NaN; a metric that cannot be computed (AUC of one class) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsSinks:
    """Console lines like the seed's, plus one JSON object per epoch in metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: str | Path | None, is_main: bool) -> None:
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None

    def write(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        out = console()
        out.info("Train Loss: %.3f, Train Acc: %.3f", row["train_loss"], row["train_acc"])
        if row.get("val_loss") is not None:
            out.info("Val Loss: %.3f, Val Acc: %.3f, Val AUC: %.3f", row["val_loss"], row["val_acc"], row["val_auc"])
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
