"""Where progress and metrics go: the console, train.log, metrics.jsonl, steps.jsonl,
TensorBoard and Weights & Biases.

The Trainer hands per-step scalars to `step` and each epoch's metrics to `write` of the object
`MetricsSinks(...)` returns; it does not know about files or backends. Only rank 0 reports, so
a multi-rank run produces one set of curves, not one per rank: other ranks get the no-op `Sink`.

- `base`: the `Sink` interface (and no-op), `CompositeSink`, the TensorBoard/W&B tag names;
- `files`: console lines, metrics.jsonl, steps.jsonl; `tensorboard`; `wandb`;
- `logs`: console and train.log handlers per rank, tqdm on or off.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds_trainer.sinks.base import CompositeSink, Sink, close_after_error, epoch_tag
from ds_trainer.sinks.files import FileSink, write_run_config
from ds_trainer.sinks.logs import configure_logging, console, duration, progress_enabled, progress_mode
from ds_trainer.sinks.tensorboard import TensorBoardSink, add_pr_curves
from ds_trainer.sinks.wandb import WandbSink, redact_secrets, resolve_wandb_mode

if TYPE_CHECKING:
    from ds_trainer.config import LoggingSection

__all__ = [
    "CompositeSink",
    "FileSink",
    "MetricsSinks",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "add_pr_curves",
    "configure_logging",
    "console",
    "duration",
    "epoch_tag",
    "progress_enabled",
    "progress_mode",
    "redact_secrets",
    "resolve_wandb_mode",
    "write_run_config",
]


def MetricsSinks(
    run_dir: str | Path | None,
    is_main: bool,
    logging_cfg: LoggingSection | None = None,
    run_name: str = "run",
    run_config: dict[str, Any] | None = None,
    num_epochs: int | None = None,
) -> Sink:
    """The sinks of this rank: the no-op `Sink` unless `is_main`, else a `CompositeSink` of
    the files (console, metrics.jsonl, steps.jsonl) plus TensorBoard and W&B as configured.

    `logging_cfg=None` keeps the original two-argument behaviour: the files only. TensorBoard
    needs a `run_dir`; `num_epochs` goes into the console's epoch lines. Close the result (or use
    it as a context manager) so steps.jsonl, TensorBoard's last events and the W&B run are
    flushed; if a backend fails to start, those already started are closed before the error
    propagates.
    """
    if not is_main:
        return Sink()
    run_dir = Path(run_dir) if run_dir is not None else None
    backends: list[Sink] = [FileSink(run_dir, num_epochs)]
    if logging_cfg is None:
        return CompositeSink(backends)
    try:
        if logging_cfg.tensorboard and run_dir is not None:
            backends.append(TensorBoardSink(run_dir))
        if logging_cfg.wandb.enabled:
            wandb_sink = WandbSink.start(logging_cfg.wandb, run_dir, run_name, run_config)
            if wandb_sink is not None:
                backends.append(wandb_sink)
    except BaseException as exc:
        close_after_error(CompositeSink(backends), exc)
        raise
    return CompositeSink(backends)
