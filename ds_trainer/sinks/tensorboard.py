"""TensorBoard: per-step and per-epoch scalars and PR curves, under the run's `tensorboard/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ds_trainer.errors import ConfigError
from ds_trainer.sinks.base import Sink, epoch_scalars, finite_scalars, row_step


def _open_tensorboard(run_dir: Path, purge_step: int | None = None) -> Any:
    # Exception, not ImportError: a broken install can fail with anything inside its import.
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:
        raise ConfigError(
            f"TensorBoard logging needs the tensorboard package ({exc}); "
            "pip install tensorboard==2.21.0, or set logging.tensorboard false"
        ) from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


def add_pr_curves(writer: Any, step: int, scores: Any, labels: Any, generators: Any = None, prefix: str = "pr") -> None:
    """TensorBoard PR curves: every image (`<prefix>/all`) and each generator (`<prefix>/<name>`)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if len(scores) == 0:
        return
    writer.add_pr_curve(f"{prefix}/all", labels, scores, global_step=step)
    if generators is not None and len(generators):
        names = np.asarray(generators, dtype=object)
        for g in sorted(set(names.tolist())):
            mask = names == g
            writer.add_pr_curve(f"{prefix}/{g}", labels[mask], scores[mask], global_step=step)


class TensorBoardSink(Sink):
    """Step scalars as logged (`train/loss`), epoch rows as `epoch/*` and `val/*` at the row's step.

    Buffered by SummaryWriter; flushed after each epoch row, so a crash loses at most the
    current epoch's points. After close() it records nothing.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._writer: Any = _open_tensorboard(run_dir)

    def step(self, global_step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in finite_scalars(scalars).items():
            self._writer.add_scalar(tag, value, global_step)

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = row_step(row)
        for tag, value in epoch_scalars(row).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def rewind(self, epoch: int, step: int) -> None:
        """Hides the points after `step` (SummaryWriter's purge_step); the event files stay."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None  # if reopening fails, the sink counts as closed, not half-open
        self._writer = _open_tensorboard(self.run_dir, purge_step=step + 1)

    def pr_curves(self, global_step: int, predictions: dict[str, Any] | None) -> None:
        """Every image (`pr/all`) and each generator (`pr/<name>`)."""
        if self._writer is None or not predictions:
            return
        add_pr_curves(
            self._writer, global_step, predictions["score"], predictions["label"], predictions.get("generator")
        )
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
