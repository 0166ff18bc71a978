"""The one interface of every metrics backend, its no-op, and the composite that fans out.

`Sink` itself does nothing in every method: it is what a rank that does not report gets, so the
Trainer calls the same methods on every rank and no backend asks which rank it is on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

# The package's logger, as before it was split into modules.
log = logging.getLogger("ds_trainer.sinks")
_S = TypeVar("_S", bound="Sink")


class Sink:
    """Where a run's metrics go; this base does nothing. Backends override what they handle.

    A context manager: leaving the `with` block closes it, also when the block raised.
    """

    @property
    def wandb_run(self) -> Any:
        """The live W&B run (None when W&B is off, closed, or on other ranks)."""
        return None

    def step(self, global_step: int, scalars: dict[str, float]) -> None:
        """Per-optimizer-step scalars (`train/loss`, `train/lr`, `train/grad_norm`, ...).

        Called every logged step, so backends keep it cheap (no flush). Values must already be
        Python numbers (a tensor would force a device sync here).
        """

    def write(self, row: dict[str, Any]) -> None:
        """One epoch's row of metrics (`epoch`, `step`, `train_loss`, `val_auc`, ...)."""

    def rewind(self, epoch: int, step: int) -> None:
        """A resume from (epoch, step): forget what was logged after it, since it is about to be redone."""

    def pr_curves(self, global_step: int, predictions: dict[str, Any] | None) -> None:
        """PR curves of an evaluation (`predictions`: `score`, `label`, optional `generator`)."""

    def close(self) -> None:
        """Flush and release what the backend holds. Idempotent."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            close_after_error(self, exc)


def close_after_error(sink: Sink, error: BaseException) -> None:
    """Close `sink` while `error` is propagating: a failing close is logged, not raised, so the
    error that stopped the run is the one reported."""
    try:
        sink.close()
    except Exception as exc:
        # One line (a full disk fails every backend's close too); the traceback at debug level.
        log.error("closing the metrics sinks after %s failed too: %s", type(error).__name__, exc)
        log.debug("closing the metrics sinks failed", exc_info=exc)


class CompositeSink(Sink):
    """Forwards every call to its backends, in order.

    The files come first, so a row reaches metrics.jsonl even if TensorBoard or W&B then fails.
    """

    def __init__(self, backends: Sequence[Sink]) -> None:
        self.backends = tuple(backends)
        self._closed = False

    @property
    def wandb_run(self) -> Any:
        return next((b.wandb_run for b in self.backends if b.wandb_run is not None), None)

    def step(self, global_step: int, scalars: dict[str, float]) -> None:
        for backend in self.backends:
            backend.step(global_step, scalars)

    def write(self, row: dict[str, Any]) -> None:
        for backend in self.backends:
            backend.write(row)

    def rewind(self, epoch: int, step: int) -> None:
        for backend in self.backends:
            backend.rewind(epoch, step)

    def pr_curves(self, global_step: int, predictions: dict[str, Any] | None) -> None:
        for backend in self.backends:
            backend.pr_curves(global_step, predictions)

    def close(self) -> None:
        """Close every backend, even when one of them raises; then raise the first error.

        BaseException too: a Ctrl-C inside TensorBoard's close must not leave the W&B run open.
        """
        if self._closed:
            return
        self._closed = True
        first: BaseException | None = None
        for backend in self.backends:
            try:
                backend.close()
            except BaseException as exc:
                if first is None:
                    first = exc
                else:
                    log.error("closing %s failed too", type(backend).__name__, exc_info=exc)
        if first is not None:
            raise first


def finite_scalars(scalars: dict[str, float]) -> dict[str, float]:
    # A NaN or inf is no point on a curve (the jsonl files record it as null instead).
    values = {k: float(v) for k, v in scalars.items()}
    return {k: v for k, v in values.items() if math.isfinite(v)}


def epoch_tag(key: str) -> str:
    """The TensorBoard/W&B name of an epoch-row key.

    `val_auc` -> `val/auc`; everything else goes under `epoch/` (`train_loss` ->
    `epoch/train_loss`), so epoch means never share a curve with the per-step `train/*`.
    """
    if key.startswith("val_"):
        return "val/" + key[len("val_") :]
    return "epoch/" + key


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    # Only finite numbers become points: `monitor` is a name, and a NaN AUC is no data.
    out: dict[str, float] = {}
    for key, value in row.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key != "step" and number and math.isfinite(value):
            out[epoch_tag(key)] = float(value)
    return out


def row_step(row: dict[str, Any]) -> int:
    """The x of an epoch row's points: its optimizer step (its epoch in a row without one)."""
    return int(row.get("step", row.get("epoch", 0)))
