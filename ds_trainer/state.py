"""What a run carries from one process to the next, behind one `state_dict()` / `load_state_dict()`.

Every part is plain data or a pure policy, testable without an engine:
- `Progress`: the last finished epoch and, after a preemption, how far into the next one the run got
  (its batches, its train totals over all ranks, and each rank's loader position);
- `EpochTotals`: an epoch's train sums as named fields (v1 checkpoints held a positional list);
- `BestTracker`: the monitored metric's best value, best/early-stopping decisions as a pure
  `update(value, row) -> Verdict`;
- `TrainState`: those parts together (and the plateau scheduler's state, which its owner applies).

The checkpoint's metadata file is written and read in `resume.py` alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ds_trainer.calibration import Calibration
from ds_trainer.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class EpochTotals:
    """An epoch's train sums over all ranks."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    bad: float = 0.0
    nonfinite: float = 0.0

    def __add__(self, other: EpochTotals) -> EpochTotals:
        return EpochTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | list[float] | None) -> EpochTotals | None:
        """A v2 dict, or v1's positional list (loss sum, correct, seen, bad, non-finite)."""
        if state is None:
            return None
        if isinstance(state, (list, tuple)):
            values = [float(x) for x in state] + [0.0] * (len(fields(cls)) - len(state))
            return cls(*values[: len(fields(cls))])
        return cls(**{f.name: float(state.get(f.name, 0.0)) for f in fields(cls)})


@dataclass
class Progress:
    """Where the run is: `epoch` finished; after a preemption, `batches_done` of epoch + 1 too."""

    epoch: int = 0
    batches_done: int = 0
    partial: EpochTotals | None = None  # the interrupted epoch's totals so far (all ranks)
    data: list[Any] | None = None  # per rank: the train loader's position at the preemption

    def state_dict(self) -> dict[str, Any]:
        preempted = self.batches_done > 0
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "partial_epoch": self.partial.state_dict() if preempted and self.partial is not None else None,
            "data": self.data if preempted else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.batches_done = int(state.get("batches_done", 0))
        self.partial = EpochTotals.from_state(state.get("partial_epoch")) if self.batches_done else None
        self.data = state.get("data") if self.batches_done else None

    def data_for(self, rank: int, world_size: int) -> Any:
        """This rank's loader position, when the checkpoint was saved by as many ranks."""
        if self.data is not None and len(self.data) == world_size:
            return self.data[rank]
        return None

    def take_start(self, rank: int, world_size: int) -> tuple[int, Any, EpochTotals | None]:
        """(batches to skip, this rank's loader position, totals so far) for the next epoch; then cleared."""
        start = (self.batches_done, self.data_for(rank, world_size), self.partial)
        self.start_epoch()
        return start

    def preempted_at(self, batches_done: int, totals: EpochTotals | None, data: list[Any] | None) -> None:
        """The run stopped `batches_done` batches into epoch + 1: what a resume needs to go on from there."""
        self.batches_done, self.partial, self.data = batches_done, totals, data

    def start_epoch(self) -> None:
        """The interrupted epoch is being trained again: its preemption record is used up."""
        self.batches_done, self.partial, self.data = 0, None, None


@dataclass(frozen=True)
class Verdict:
    improved: bool  # a new best: save `best`
    stop: bool  # early stopping: no improvement for `patience` epochs


def epoch_checkpoint_due(epoch: int, num_epochs: int, save_frequency: int, stopping: bool) -> bool:
    """`epoch_N` is saved at the last epoch, when stopping early, and every `save_frequency` epochs (0: never)."""
    return epoch == num_epochs or stopping or (save_frequency > 0 and epoch % save_frequency == 0)


def monitored_value(row: dict[str, Any], monitor: str, epoch: int) -> float:
    """The epoch's value of the monitored metric; a NaN is said once (it counts as no improvement)."""
    value = float(row[monitor])
    if math.isnan(value):
        log.warning("epoch %d: %s is NaN (one-class validation set?); counted as no improvement", epoch, monitor)
    return value


class BestTracker:
    """The monitored metric's best value and the epochs since it last improved.

    A NaN value (e.g. the AUC of a one-class validation set) never improves.
    """

    def __init__(
        self,
        monitor: str,
        higher_is_better: bool,
        min_delta: float = 0.0,
        patience: int = 0,
        early_stopping: bool = False,
    ) -> None:
        self.monitor = monitor
        self.higher_is_better = higher_is_better
        self.min_delta = min_delta
        self.patience = patience
        self.early_stopping = early_stopping
        self.best_metric: float | None = None
        self.best_row: dict[str, Any] | None = None
        self.epochs_without_improvement = 0

    @classmethod
    def for_training(cls, t: Any, monitor: str) -> BestTracker:
        """From a TrainingSection, following `monitor` (which may differ from t.monitor: see engine.resolve_monitor)."""
        higher = t.model_copy(update={"monitor": monitor}).monitor_higher_is_better
        return cls(monitor, higher, t.min_delta, t.patience, t.early_stopping)

    def is_improvement(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        if self.higher_is_better:
            return value > self.best_metric + self.min_delta
        return value < self.best_metric - self.min_delta

    def update(self, value: float, row: dict[str, Any] | None = None) -> Verdict:
        improved = self.is_improvement(value)
        if improved:
            self.best_metric, self.epochs_without_improvement = value, 0
            self.best_row = {k: v for k, v in (row or {}).items() if isinstance(v, (int, float))}
        else:
            self.epochs_without_improvement += 1
        stop = self.early_stopping and self.epochs_without_improvement >= self.patience
        return Verdict(improved, stop)

    def summary(self, where: Any) -> str:
        """One line on the best checkpoint (call once there is one)."""
        row = self.best_row or {}
        shown = ", ".join(f"{k} {row[k]:.4f}" for k in ("val_auc", "val_acc", "val_loss", "train_loss") if k in row)
        return f"{where} (epoch {row.get('epoch')}, {self.monitor} {self.best_metric:.4f}; {shown})"

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_metric": self.best_metric,
            "best_row": self.best_row,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint that monitored another metric starts the tracking afresh."""
        then = state.get("monitor", self.monitor)
        if then != self.monitor:
            log.warning("the checkpoint monitored %s, this run monitors %s: best metric reset", then, self.monitor)
            return
        self.best_metric = state.get("best_metric")
        self.best_row = state.get("best_row")
        self.epochs_without_improvement = int(state.get("epochs_without_improvement", 0))


class TrainState:
    """Everything resumable the Trainer itself owns (the engine checkpoints its own state)."""

    def __init__(self, best: BestTracker) -> None:
        self.progress = Progress()
        self.best = best
        self.plateau: dict[str, Any] | None = None  # the plateau scheduler's state, applied by its owner
        # the last threshold and temperature fitted on the holdout (eval_thresholds), saved with each checkpoint
        self.calibration: Calibration | None = None

    def state_dict(self) -> dict[str, Any]:
        calibration = self.calibration.to_dict() if self.calibration is not None else None
        return {**self.progress.state_dict(), **self.best.state_dict(), "plateau": self.plateau,
                "calibration": calibration}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress.load_state_dict(state)
        self.best.load_state_dict(state)
        self.plateau = state.get("plateau")
        raw = state.get("calibration")
        try:
            self.calibration = Calibration.from_dict(raw, "the checkpoint") if raw is not None else None
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
