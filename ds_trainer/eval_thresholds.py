"""Threshold modes: where training's validation rows and `ds-trainer eval --threshold` cut P(AI).

- `0.5`: GenImage's protocol; eval's main table, always.
- a number in (0, 1): that fixed cut.
- `calibrated`: the threshold (and temperature) fitted on the holdout of the training generators at
  a validation of the run (`calibration.fit`), stored with the checkpoint. In training it is fitted
  anew at every validation on the holdout, and with `data.threshold: calibrated` the row's
  accuracies use it (fitted and scored on the same holdout, so in-sample there); in eval it is read
  from the checkpoint: the test labels never touch it.
- `oracle` (eval only): per generator, the cut tuned on that generator's test labels, printed as a
  labelled upper bound (UnivFD's "best threshold" accuracy).

Eval's JSON has a `thresholds` block: mode -> {label, threshold(s), temperature, generators table}.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from ds_trainer.calibration import ORACLE_LABEL, Calibration, fit, oracle_thresholds
from ds_trainer.errors import ConfigError
from ds_trainer.metrics import format_protocol_table, per_generator_metrics

log = logging.getLogger(__name__)

CALIBRATED, ORACLE = "calibrated", "oracle"


def parse_modes(values: Sequence[str]) -> list[str | float]:
    """`--threshold` values (repeatable, comma-separated): calibrated, oracle or a number in (0, 1);
    0.5 is the main table already and is dropped; the order is kept, repeats once."""
    modes: list[str | float] = []
    for value in (v.strip() for text in values for v in text.split(",")):
        mode: str | float
        if value in (CALIBRATED, ORACLE):
            mode = value
        else:
            try:
                mode = float(value)
            except ValueError:
                mode = -1.0
            if not 0.0 < mode < 1.0:
                raise ConfigError(
                    f"--threshold {value or repr(value)}: use calibrated (fitted on the training generators' "
                    "holdout, stored with the checkpoint), oracle (tuned on the test labels: an upper bound) or "
                    "a number in (0, 1)"
                )
            if mode == 0.5:
                continue
        if mode not in modes:
            modes.append(mode)
    return modes


def stored_calibration(meta: Any) -> Calibration | None:
    """The calibration a checkpoint's marker records (None: its run had no holdout)."""
    raw = meta.get("calibration")
    if raw is None:
        return None
    try:
        return Calibration.from_dict(raw, str(meta.tag_dir))
    except ValueError as exc:
        from ds_trainer.errors import CheckpointError

        raise CheckpointError(str(exc)) from None


def require_calibration(cal: Calibration | None, where: Any, what: str) -> Calibration:
    if cal is None:
        raise ConfigError(
            f"{what}: {where} holds no calibrated threshold: its run had no holdout (data.holdout_fraction 0), "
            "and a threshold fitted on the test set would be an oracle. Train with data.holdout_fraction (e.g. "
            "0.1), or use a fixed threshold (0.5) or --threshold oracle (labelled upper bound)"
        )
    return cal


def decision(mode: str | float, cal: Calibration | None) -> tuple[float, float]:
    """(threshold on P(AI), temperature) of a mode; `cal` must be there for calibrated."""
    if mode == CALIBRATED:
        assert cal is not None
        return cal.threshold, cal.temperature
    return float(mode), 1.0


# ------------------------------------------------------------------------------ training's validation
def fit_on_holdout(data: Any, predictions: dict[str, Any] | None, epoch: int) -> Calibration | None:
    """The calibration of one validation on the holdout (None without a holdout, or with one class)."""
    if data.holdout_fraction <= 0 or not predictions or not len(predictions["label"]):
        return None
    generators = ", ".join(data.train_generators) if data.train_generators else "all training generators"
    where = f"the holdout ({data.holdout_fraction:g}) of split {data.train_split} ({generators})"
    try:
        return fit(predictions["score"], predictions["label"], where, epoch)
    except ValueError as exc:
        log.warning("epoch %d: no calibrated threshold: %s", epoch, exc)
        return None


def validation_row(data: Any, predictions: dict[str, Any] | None, cal: Calibration | None,
                   trained: Collection[str] | None) -> dict[str, Any]:  # fmt: skip
    """What the row adds or replaces: val_threshold (the cut its accuracies use), the fitted
    val_calibrated_threshold / val_temperature, and, at a cut other than 0.5, the re-scored metrics."""
    from ds_trainer.evaluation import generator_metrics, overall_metrics

    row: dict[str, Any] = {}
    if cal is not None:
        row.update(val_calibrated_threshold=cal.threshold, val_temperature=cal.temperature)
    mode = data.threshold
    if mode == CALIBRATED and cal is None:
        log.warning("data.threshold calibrated: no calibration this validation; its row is at 0.5")
        mode = 0.5
    threshold, temperature = decision(mode, cal)
    row["val_threshold"] = threshold
    if (threshold, temperature) == (0.5, 1.0) or not predictions:
        return row
    s, y = _scored(predictions["score"], cal if mode == CALIBRATED else None), predictions["label"]
    cut = cal.calibrate([threshold])[0] if mode == CALIBRATED and cal is not None else threshold
    row.update(overall_metrics(s, y, cut))
    if predictions.get("generator") is not None:
        row.update(generator_metrics(s, y, predictions["generator"], trained, cut))
    return row


def _scored(scores: Any, cal: Calibration | None) -> np.ndarray:
    """Scores as the calibrated mode sees them: temperature-scaled (ECE and NLL then measure them)."""
    return cal.calibrate(scores) if cal is not None else np.asarray(scores, dtype=np.float64)


# ------------------------------------------------------------------------------ eval's tables
def threshold_tables(modes: Sequence[str | float], predictions: dict[str, Any], cal: Calibration | None,
                     trained: Collection[str] | None) -> dict[str, Any]:  # fmt: skip
    """Eval's `thresholds` block: one protocol table per mode, from the clean pass's predictions."""
    s, y, g = predictions["score"], predictions["label"], predictions.get("generator")
    if g is None:
        raise ConfigError("--threshold tables are per generator: they need the streaming shard loader")
    out: dict[str, Any] = {}
    for mode in modes:
        if mode == ORACLE:
            cuts = oracle_thresholds(s, y, g)
            out[ORACLE] = {"label": ORACLE_LABEL, "oracle": True, "thresholds": cuts,
                           "generators": per_generator_metrics(s, y, g, trained, cuts)}  # fmt: skip
        elif mode == CALIBRATED:
            assert cal is not None
            scaled, cut = cal.calibrate(s), float(cal.calibrate([cal.threshold])[0])
            out[CALIBRATED] = {
                "label": f"calibrated: {cal.describe()}; ECE and NLL of the temperature-scaled scores",
                "oracle": False, **cal.to_dict(), "generators": per_generator_metrics(scaled, y, g, trained, cut),
            }  # fmt: skip
        else:
            out[f"{mode:g}"] = {"label": f"fixed threshold {mode:g}", "oracle": False, "threshold": mode,
                                "generators": per_generator_metrics(s, y, g, trained, float(mode))}  # fmt: skip
    return out


def format_thresholds(blocks: dict[str, Any]) -> str:
    parts = []
    for name, b in blocks.items():
        head = f"threshold {name}: {b['label']}"
        if name == ORACLE:
            head = f"threshold {name} (ORACLE, not comparable with the tables above): {b['label']}"
        parts.append(head)
        parts.append(format_protocol_table(b["generators"]))
    return "\n".join(parts)
