"""Metrics beyond accuracy on P(AI) scores: balanced accuracy, operating points on the ROC (EER,
TPR at a fixed FPR) and calibration (ECE, NLL).

The ROC and calibration functions take a leading batch axis, so the bootstrap
(`ds_trainer.bootstrap`) evaluates every resample in one call; the point estimates here pass one
curve. scikit-learn computes what it has (the ROC itself, balanced accuracy, log loss).

Conventions (the README's evaluation section repeats them):
- EER: the ROC is linear between its points (a random choice between two thresholds reaches any
  point on the segment); the EER is where that line has FPR = FNR (= 1 - TPR). This is what
  DeepfakeBench's `brentq(lambda x: 1 - x - interp1d(fpr, tpr)(x), 0, 1)` finds, without its trouble
  on vertical segments.
- TPR at FPR x: the highest TPR on that line at FPR = x (the top of a vertical segment at x).
- ECE: 15 equal-width bins of P(AI) on [0, 1] (the last one closed); per bin |mean P(AI) - share of
  AI images|, weighted by the bin's share of images. A reliability diagram plots the same bins.
- NLL: the mean of -log P(true class), P clipped to [eps, 1 - eps] (float64 eps), as log_loss does.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
# key -> the false positive rate it reads the TPR at
FPR_POINTS = {"tpr_at_fpr_1pct": 0.01, "tpr_at_fpr_5pct": 0.05}
EXTRA_METRICS = ("bal_acc", "eer", *FPR_POINTS, "ece", "nll")
# lower is better for these; higher for every other metric
LOWER_IS_BETTER = frozenset({"eer", "ece", "nll"})
_EPS = float(np.finfo(np.float64).eps)


def eer(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """EER of each ROC in `fpr`, `tpr` [B, k]: points in threshold order from (0, 0) to (1, 1)."""
    # FPR - FNR rises from -1 to 1 along the curve: find the first point where it is >= 0
    j = _first_true(lambda i: _at(fpr, i) - (1.0 - _at(tpr, i)) >= 0, fpr.shape)
    j = np.clip(j, 1, fpr.shape[1] - 1)
    x0, x1, y0, y1 = _at(fpr, j - 1), _at(fpr, j), _at(tpr, j - 1), _at(tpr, j)
    f0, f1 = x0 - (1.0 - y0), x1 - (1.0 - y1)
    t = np.divide(-f0, f1 - f0, out=np.zeros(f0.shape), where=f1 > f0)
    return x0 + t * (x1 - x0)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, x: float) -> np.ndarray:
    """TPR at false positive rate `x` of each ROC [B, k], laid out as in `eer`."""
    k, rows = fpr.shape[1], np.arange(fpr.shape[0])
    # compared in the curve's own precision: a float32 FPR of exactly 15/300 equals float32(0.05)
    x_ = np.asarray(x, dtype=fpr.dtype)
    j = np.clip(_first_true(lambda i: fpr[rows, i] > x_, fpr.shape) - 1, 0, k - 1)  # last point with FPR <= x
    nxt = np.minimum(j + 1, k - 1)
    x0, x1, y0, y1 = _at(fpr, j), _at(fpr, nxt), _at(tpr, j), _at(tpr, nxt)
    t = np.divide(x - x0, x1 - x0, out=np.zeros(x0.shape), where=x1 > x0)
    return y0 + np.clip(t, 0.0, 1.0) * (y1 - y0)


def _at(a: np.ndarray, i: np.ndarray) -> np.ndarray:
    """a[b, i[b]] for every row b, in float64."""
    return a[np.arange(a.shape[0]), i].astype(np.float64)


def _first_true(pred, shape: tuple[int, int]) -> np.ndarray:
    """Per row, the first column where `pred` (monotone: False then True along each row) holds,
    or the row length; a bisection on every row at once, so a curve is never scanned whole."""
    lo = np.zeros(shape[0], dtype=np.int64)
    hi = np.full(shape[0], shape[1], dtype=np.int64)
    while (lo < hi).any():
        mid = (lo + hi) // 2
        ok = pred(np.minimum(mid, shape[1] - 1)) & (lo < hi)
        hi = np.where(ok, mid, hi)
        lo = np.where(~ok & (lo < hi), mid + 1, lo)
    return lo


def bin_index(scores: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Each score's calibration bin: [i/n, (i+1)/n), the last bin closed at 1."""
    return np.clip((np.asarray(scores, dtype=np.float64) * n_bins).astype(np.int64), 0, n_bins - 1)


def bin_sums(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, sum of P(AI), AI images) per bin [..., n_bins]; `weights` [..., n] count each image
    (a bootstrap resample's multiplicities), default once."""
    s = np.asarray(scores, dtype=np.float64)
    onehot = np.zeros((s.size, n_bins))
    onehot[np.arange(s.size), bin_index(s, n_bins)] = 1.0
    w = np.ones((1, s.size)) if weights is None else np.asarray(weights, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    counts, conf, pos = w @ onehot, w @ (onehot * s[:, None]), w @ (onehot * y[:, None])
    return (counts[0], conf[0], pos[0]) if weights is None else (counts, conf, pos)


def ece_from_bins(counts: np.ndarray, conf: np.ndarray, pos: np.ndarray) -> np.ndarray | float:
    """sum over bins of |mean P(AI) - share AI| x bin share = sum |conf - pos| / images."""
    total = counts.sum(axis=-1)
    return np.abs(conf - pos).sum(axis=-1) / np.where(total > 0, total, np.nan)


def nll_per_image(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1.0 - _EPS)
    return -np.where(np.asarray(labels) == 1, np.log(p), np.log1p(-p))


def extra_metrics(s: np.ndarray, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The point estimates of EXTRA_METRICS for scores `s`, labels `y`, predictions `pred` (NaN
    where they need both classes and one is missing)."""
    from sklearn.metrics import balanced_accuracy_score, log_loss, roc_curve

    out = dict.fromkeys(EXTRA_METRICS, math.nan)
    out["ece"] = float(ece_from_bins(*bin_sums(s, y)))
    out["nll"] = float(log_loss(y, s, labels=[0, 1]))
    if (y == 0).any() and (y == 1).any():
        out["bal_acc"] = float(balanced_accuracy_score(y, pred))
        fpr, tpr, _ = roc_curve(y, s)
        out["eer"] = float(eer(fpr[None], tpr[None])[0])
        for key, x in FPR_POINTS.items():
            out[key] = float(tpr_at_fpr(fpr[None], tpr[None], x)[0])
    return out
