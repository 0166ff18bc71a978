"""Where progress and metrics go: the console, train.log, metrics.jsonl, steps.jsonl,
TensorBoard and Weights & Biases.

The Trainer hands per-step scalars to `MetricsSinks.step` and each epoch's metrics to
`MetricsSinks.write`; it does not know about files or backends. Only rank 0 writes, so a
multi-rank run produces one set of curves, not one per rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ds_trainer.errors import ConfigError

if TYPE_CHECKING:
    from ds_trainer.config import LoggingSection, WandbSection

log = logging.getLogger(__name__)
_CONSOLE = "ds_trainer.console"
# A config key containing one of these is dropped before the config reaches W&B: its
# config is uploaded and also printed into wandb's own debug.log, even offline.
_SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")
_WANDB_FIX = "pip install wandb==0.31.0, or set logging.wandb.enabled false"


def configure_logging(
    rank: int, run_dir: str | Path | None, debug: bool | None = None
) -> None:
    """Rank 0 by default, all ranks at debug.

    Normally rank 0 prints the seed's console lines and writes everything to train.log, while
    other ranks only speak up for warnings (so a failing rank 1 is still heard without eight
    copies of every line). At debug level every rank logs DEBUG to its console and train.log,
    because a hang or a mismatch between ranks can only be diagnosed from all of them.

    `debug=None` keeps the level an earlier call chose (the CLI's --debug survives the Trainer's
    own call for its run directory).
    """
    root = logging.getLogger("ds_trainer")
    if debug is not None:
        root.setLevel(logging.DEBUG if debug else logging.INFO)
    elif root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.propagate = False
    verbose = root.level <= logging.DEBUG
    for handler in list(root.handlers):
        if getattr(handler, "_ds_trainer", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = []
    console_handler = logging.StreamHandler(sys.stdout)
    # Rank 0's console keeps the seed's bare lines; other ranks say who they are.
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console_handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    if verbose:
        console_handler.setLevel(logging.DEBUG)
    else:
        console_handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers.append(console_handler)
    if run_dir is not None:
        path = Path(run_dir) / "train.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Append mode: every rank shares the one file, each line tagged with its rank.
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
            )
        )
        file_handler.setLevel(
            logging.DEBUG if rank == 0 or verbose else logging.WARNING
        )
        handlers.append(file_handler)
    for handler in handlers:
        handler._ds_trainer = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def console() -> logging.Logger:
    return logging.getLogger(_CONSOLE)


def progress_enabled(is_main: bool, setting: str) -> bool:
    """Whether to draw tqdm bars: rank 0 only; `auto` only on a terminal.

    Under a scheduler or CI stdout is a file, where a bar's carriage returns become thousands
    of junk lines, so `auto` stays quiet there; `on`/`off` override the guess.
    """
    if not is_main or setting == "off":
        return False
    if setting == "on":
        return True
    if setting != "auto":
        raise ValueError(f"progress_bar must be auto, on or off, not {setting!r}")
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def redact_secrets(value: Any) -> Any:
    """A copy of a config tree without values under secret-looking keys (api_key, token, ...).

    The run config goes to W&B's servers and its local logs; a credential that slipped into
    the YAML must not go with it.
    """
    if isinstance(value, dict):
        return {
            k: redact_secrets(v)
            for k, v in value.items()
            if not any(m in str(k).lower() for m in _SECRET_MARKERS)
        }
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value]
    return value


def resolve_wandb_mode(mode: str | None) -> str:
    """`None` means online when WANDB_API_KEY is set, else offline (never a login prompt)."""
    if mode is not None:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _clean(value: Any) -> Any:
    # JSON has no NaN; a metric that cannot be computed (AUC of one class) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def epoch_tag(key: str) -> str:
    """The TensorBoard/W&B name of an epoch-row key.

    `val_auc` -> `val/auc`; everything else goes under `epoch/` (`train_loss` ->
    `epoch/train_loss`), so epoch means never share a curve with the per-step `train/*`.
    """
    if key.startswith("val_"):
        return "val/" + key[len("val_") :]
    return "epoch/" + key


def _epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    # Only finite numbers become points: `monitor` is a name, and a NaN AUC is no data.
    out: dict[str, float] = {}
    for key, value in row.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key != "step" and number and math.isfinite(value):
            out[epoch_tag(key)] = float(value)
    return out


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


def _init_wandb(
    cfg: WandbSection,
    run_dir: Path | None,
    run_name: str,
    run_config: dict[str, Any] | None,
) -> Any:
    """Start the W&B run, or None for mode `disabled`; every failure is a ConfigError."""
    mode = resolve_wandb_mode(cfg.mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except Exception as exc:  # not installed, or an install that fails on import
        raise ConfigError(
            f"logging.wandb.enabled is true but wandb cannot be imported ({exc}); {_WANDB_FIX}"
        ) from exc
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=cfg.project,
            name=cfg.run_name or run_name,
            entity=cfg.entity,
            tags=list(cfg.tags) or None,
            dir=str(run_dir) if run_dir is not None else None,
            mode=mode,
            config=redact_secrets(run_config or {}),
            # W&B's banners would interleave with the seed's console lines.
            settings=wandb.Settings(silent=True),
        )
    except Exception as exc:
        hint = " (offline runs need no account: set logging.wandb.mode offline)"
        raise ConfigError(
            f"wandb.init failed in mode {mode}: {exc}{hint if mode == 'online' else ''}"
        ) from exc
    console().info("W&B run %s (%s) in %s", run.name, mode, run.dir)
    return run


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


def _row_value(line: str, key: str) -> float:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return math.inf  # a line cut short by a crash: drop it
    try:
        return float(row.get(key, -math.inf))  # keyless rows are kept
    except (TypeError, ValueError, AttributeError):
        return -math.inf


class MetricsSinks:
    """Console lines like the seed's, metrics.jsonl per epoch, steps.jsonl per logged step,
    TensorBoard and W&B scalars. Only rank 0 (`is_main`) writes anything.

    `logging_cfg=None` keeps the original two-argument behaviour (console, metrics.jsonl,
    plus steps.jsonl if `step` is called): no TensorBoard, no W&B. Call `close()` at the end
    so steps.jsonl, TensorBoard's last events and the W&B run are flushed.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        is_main: bool,
        logging_cfg: LoggingSection | None = None,
        run_name: str = "run",
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.is_main = is_main
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        self.steps_path = (
            self.run_dir / "steps.jsonl" if self.run_dir is not None else None
        )
        self._steps_file: Any = None
        self._tb: Any = None
        self._wandb: Any = None
        self._closed = False
        if not is_main:
            return
        if logging_cfg is None:
            return
        if logging_cfg.tensorboard and self.run_dir is not None:
            self._tb = _open_tensorboard(self.run_dir)
        if logging_cfg.wandb.enabled:
            try:
                self._wandb = _init_wandb(
                    logging_cfg.wandb, self.run_dir, run_name, run_config
                )
            except BaseException:
                self.close()
                raise

    @property
    def wandb_run(self) -> Any:
        """The live W&B run (None when W&B is off or on other ranks)."""
        return self._wandb

    def step(self, global_step: int, scalars: dict[str, float]) -> None:
        """Per-optimizer-step scalars (`train/loss`, `train/lr`, `train/grad_norm`, ...).

        Cheap by design: one line appended to an open steps.jsonl, TensorBoard's buffered
        writer, and W&B's asynchronous log; no flush. Values must already be Python numbers
        (a tensor would force a device sync here).
        """
        if not self.is_main:
            return
        values = {k: float(v) for k, v in scalars.items()}
        if self.steps_path is not None:
            line = {
                "step": int(global_step),
                "time": round(time.time(), 3),  # wall clock: time to first step, step rates
                **{k: _clean(v) for k, v in values.items()},
            }
            self._append_step(json.dumps(line) + "\n")
        if self._closed:
            return
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        if self._tb is not None:
            for tag, value in finite.items():
                self._tb.add_scalar(tag, value, global_step)
        if self._wandb is not None and finite:
            self._wandb.log(finite, step=int(global_step))

    def _append_step(self, line: str) -> None:
        # Kept open while the sinks are live; line-buffered, so a reader (or a crash) sees
        # every finished line. After close() the jsonl files still record (per write).
        assert self.steps_path is not None
        if self._steps_file is None and not self._closed:
            self.steps_path.parent.mkdir(parents=True, exist_ok=True)
            self._steps_file = self.steps_path.open("a", buffering=1)
        if self._steps_file is not None:
            self._steps_file.write(line)
            return
        with self.steps_path.open("a") as f:
            f.write(line)

    def write(self, row: dict[str, Any]) -> None:
        """One epoch's row: console lines, metrics.jsonl, and TensorBoard/W&B at `row["step"]`.

        TensorBoard is flushed here so a crash loses at most the current epoch's points.
        """
        if not self.is_main:
            return
        out = console()
        if "train_loss" in row:  # a zero-shot run only evaluates
            out.info("Train Loss: %.3f, Train Acc: %.3f", row["train_loss"], row["train_acc"])
        if row.get("val_loss") is not None:
            out.info(
                "Val Loss: %.3f, Val Acc: %.3f, Val AUC: %.3f",
                row["val_loss"],
                row["val_acc"],
                row["val_auc"],
            )
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if self._closed:
            return
        step = int(row.get("step", row.get("epoch", 0)))
        scalars = _epoch_scalars(row)
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def rewind(self, epoch: int, step: int) -> None:
        """A resume from (epoch, step): forget what was logged after it, since it is about to be redone.

        A run that died after logging an epoch but before its checkpoint was complete would
        otherwise list that epoch twice. metrics.jsonl keeps epochs <= `epoch`, steps.jsonl steps
        <= `step`; TensorBoard hides later points (SummaryWriter's purge_step). W&B cannot forget.
        """
        if not self.is_main:
            return
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
                path.write_text("".join(kept))
        if self._tb is not None and self.run_dir is not None:
            self._tb.close()
            self._tb = _open_tensorboard(self.run_dir, purge_step=step + 1)

    def pr_curves(self, global_step: int, predictions: dict[str, Any] | None) -> None:
        """TensorBoard PR curves of an evaluation: every image (`pr/all`) and each generator (`pr/<name>`)."""
        if not self.is_main or self._tb is None or self._closed or not predictions:
            return
        add_pr_curves(self._tb, global_step, predictions["score"], predictions["label"], predictions.get("generator"))
        self._tb.flush()

    def close(self) -> None:
        """Flush and close steps.jsonl and TensorBoard, finish the W&B run. Idempotent.

        Later `step`/`write` calls still append to the jsonl files and print (a Trainer may
        evaluate after training), but no longer reach TensorBoard or W&B.
        """
        if self._closed:
            return
        self._closed = True
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            run.finish()
