"""Decision thresholds not tuned on the test set, and temperature scaling.

GenImage reports accuracy at P(AI) >= 0.5. UnivFD's "best threshold" accuracy picks, per test set,
the threshold that scores best on that test set's own labels: an oracle, an upper bound. The fair
alternative here is fitted on the holdout of the *training* generators (`data.holdout_fraction`),
at every validation of a run, and stored with each checkpoint (`Calibration`, the marker's
`calibration` field); `ds-trainer eval --threshold calibrated`, `export` and `predict` reuse it.

- Threshold: the one with the highest balanced accuracy on the holdout ((TPR + TNR) / 2, so a
  holdout with more of one class does not pull it), placed halfway between the two holdout scores
  it separates; among equally good cuts, the one nearest 0.5.
- Temperature (Guo et al., 2017): T > 0 minimising the holdout's NLL of sigmoid(logit(P) / T).
  It rescales confidence (ECE, NLL) and leaves every ranking metric (AUC, AP, EER, TPR@FPR) and,
  applied to the threshold too, every decision unchanged.
- Oracle: per generator, the threshold with the highest accuracy on that generator's own test
  labels (UnivFD's `find_best_threshold`), placed as above. Printed only as a labelled upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# The P(AI) scores are float32 softmax outputs: clipped this far from 0 and 1, their logits stay finite.
_CLIP = 1e-7
# T is searched on log T in [log 1/100, log 100]: beyond, the holdout is separable or constant.
_LOG_T_BOUND = math.log(100.0)
ORACLE_LABEL = "oracle: per generator, the threshold tuned on that generator's own test labels (an upper bound)"


@dataclass(frozen=True)
class Calibration:
    """A decision threshold and a temperature fitted on held-out training data."""

    threshold: float  # on P(AI) as the model outputs it: P >= threshold means AI-generated
    temperature: float  # calibrated P(AI) = sigmoid(logit(P) / temperature)
    samples: int  # holdout images it was fitted on
    fitted_on: str  # which data, in words
    epoch: int | None = None  # the validation it came from

    def calibrate(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        return temperature_scale(scores, self.temperature)

    def describe(self) -> str:
        at = f" at epoch {self.epoch}" if self.epoch is not None else ""
        return (
            f"threshold {self.threshold:.4f} and temperature {self.temperature:.3f} fitted on {self.fitted_on}"
            f"{at} ({self.samples} images)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Calibration:
        """From a checkpoint's or an export's record; ValueError naming `where` if it is malformed."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: calibration is {type(raw).__name__}, not a mapping")
        try:
            cal = cls(
                threshold=float(raw["threshold"]), temperature=float(raw["temperature"]),
                samples=int(raw["samples"]), fitted_on=str(raw["fitted_on"]),
                epoch=None if raw.get("epoch") is None else int(raw["epoch"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: calibration record is malformed ({type(exc).__name__}: {exc})") from None
        if not (math.isfinite(cal.threshold) and 0.0 <= cal.threshold <= 1.0):
            raise ValueError(f"{where}: calibration threshold {cal.threshold} is not within [0, 1]")
        if not (math.isfinite(cal.temperature) and cal.temperature > 0):
            raise ValueError(f"{where}: calibration temperature {cal.temperature} is not a positive number")
        return cal


def logits(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def temperature_scale(scores: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(P) / T); T = 1 returns the scores (clipped to stay off 0 and 1)."""
    return 1.0 / (1.0 + np.exp(-logits(scores) / temperature))


def fit(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, fitted_on: str,
        epoch: int | None = None) -> Calibration:  # fmt: skip
    """Threshold and temperature from held-out predictions; ValueError unless both classes are there."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if not ((y == 0).any() and (y == 1).any()):
        raise ValueError(f"{fitted_on} holds {len(y)} images of one class only: no threshold can be fitted")
    return Calibration(best_threshold(s, y, balanced=True), fit_temperature(s, y), len(y), fitted_on, epoch)


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the mean NLL of sigmoid(logit(P) / T) (convex in 1/T: one bounded 1-D search)."""
    from scipy.optimize import minimize_scalar

    z, sign = logits(scores), np.where(np.asarray(labels) == 1, 1.0, -1.0)

    def nll(log_t: float) -> float:  # -log sigmoid(sign * z / T), computed stably
        return float(np.logaddexp(0.0, -sign * z / math.exp(log_t)).mean())

    best = minimize_scalar(nll, bounds=(-_LOG_T_BOUND, _LOG_T_BOUND), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(best.x))


def best_threshold(scores: np.ndarray, labels: np.ndarray, balanced: bool) -> float:
    """The cut on P(AI) with the best (balanced) accuracy, halfway between the two scores it separates."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    cuts = np.unique(s)[::-1]  # "AI if P >= cut", from predicting none to all as AI
    # per cut: how many of each class score at or above it
    fake_above = np.searchsorted(np.sort(-s[y == 1]), -cuts, side="right")
    real_above = np.searchsorted(np.sort(-s[y == 0]), -cuts, side="right")
    n_fake, n_real = int((y == 1).sum()), int((y == 0).sum())
    tp, tn = fake_above, n_real - real_above
    score = 0.5 * (tp / max(n_fake, 1) + tn / max(n_real, 1)) if balanced else (tp + tn) / max(len(y), 1)
    # a cut at its score; halfway to the next lower score, so the holdout's decisions stay the same
    lower = np.append(cuts[1:], max(cuts[-1] - 1e-6, 0.0))
    placed = (cuts + lower) / 2.0
    # predicting no image AI: a cut just above the highest score
    placed = np.append(placed, min(1.0, cuts[0] + 1e-6) if len(cuts) else 0.5)
    score = np.append(score, n_real / max(len(y), 1) if not balanced else 0.5)
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(placed[best[np.argmin(np.abs(placed[best] - 0.5))]])


def oracle_thresholds(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, generators: Sequence[str]
) -> dict[str, float]:
    """Per generator, the threshold with the best accuracy on its own labels (see ORACLE_LABEL)."""
    s, y, g = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64), np.asarray(generators)
    return {name: best_threshold(s[g == name], y[g == name], balanced=False) for name in sorted(set(g.tolist()))}
