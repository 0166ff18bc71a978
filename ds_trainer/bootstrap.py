"""Bootstrap confidence intervals for every protocol metric, per generator and for the means.

Percentile bootstrap, stratified: each resample draws, with replacement, as many real images as a
generator has from its reals and as many AI images from its fakes (a resample never loses a
class, and each class keeps its size). A mean's interval comes from the mean of the generators'
resampled values in each resample (generators are resampled independently), so it says how much
the published mean could move with another draw of each generator's test images.

Vectorised: a resample is a row of multiplicities over a generator's images, sorted once by
score, so every resample's ROC is a cumulative sum (no per-resample sort) and the calibration bins
a matrix product. Each generator draws from its own stream, seeded by (seed, its name): the same
seed gives the same intervals, and adding a generator does not move the others'.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from ds_trainer.detection_metrics import (
    ECE_BINS,
    FPR_POINTS,
    bin_index,
    ece_from_bins,
    eer,
    nll_per_image,
    tpr_at_fpr,
)
from ds_trainer.metrics import ALL_METRICS, MEAN, MEAN_UNSEEN, unseen_generators

DEFAULT_RESAMPLES = 1000
MAX_RESAMPLES = 100_000
LEVEL = 0.95
METHOD = "percentile bootstrap, resampling each generator's real and AI images separately"
# resample rows x images per chunk: bounds the memory of one chunk's arrays (~8 bytes each) to tens of MB
_CHUNK_CELLS = 2_000_000


def class_stratified_counts(labels: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] multiplicities (float32, exact integers): each row draws n_real of the reals and n_ai of the AI images, with replacement."""
    y = np.asarray(labels)
    rows = np.arange(resamples)[:, None] * y.size
    flat = [
        (rows + members[rng.integers(0, members.size, size=(resamples, members.size), dtype=np.int32)]).ravel()
        for members in (np.flatnonzero(y == 0), np.flatnonzero(y == 1))
        if members.size
    ]
    picks = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
    return np.bincount(picks, minlength=resamples * y.size).reshape(resamples, y.size).astype(np.float32)


def weighted_metrics(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """ALL_METRICS for each row of `weights` [B, n] (image multiplicities), at threshold 0.5.

    Equals `binary_metrics` on the images repeated by their weights (tests compare with
    scikit-learn's `sample_weight`); NaN where a resample lacks a class a metric needs. Weights
    are summed in float32, exact for integer counts below 2**24 per class; rates and sums over the
    curve in float64.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    order = np.argsort(-s, kind="stable")
    if (order != np.arange(s.size)).any():  # resampled_metrics passes images already sorted
        s, y, w = s[order], y[order], w[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last image of each distinct score
    tp = np.cumsum(w * y.astype(np.float32), axis=1)
    fp = np.cumsum(w, axis=1)
    fp -= tp
    if ends.size < s.size:
        tp, fp = tp[:, ends], fp[:, ends]
    n_ai, n_real = tp[:, -1].astype(np.float64), fp[:, -1].astype(np.float64)
    total = n_ai + n_real
    # every per-image sum in one product: correct calls (all, real, AI), NLL, and the calibration bins
    correct = ((s >= 0.5).astype(np.int64) == y).astype(np.float64)
    bins = np.zeros((s.size, ECE_BINS))
    bins[np.arange(s.size), bin_index(s)] = 1.0
    per_image = np.column_stack([correct, correct * (y == 0), correct * (y == 1), nll_per_image(s, y),
                                 bins, bins * s[:, None], bins * y[:, None]])  # fmt: skip
    sums = w.astype(np.float64) @ per_image  # float64: an NLL term reaches 36 (P clipped at eps)
    counts, conf, pos = np.split(sums[:, 4:], 3, axis=1)
    out: dict[str, np.ndarray] = {
        "acc": sums[:, 0] / total,
        "real_acc": _ratio(sums[:, 1], n_real),
        "fake_acc": _ratio(sums[:, 2], n_ai),
        "nll": sums[:, 3] / total,
        "ece": ece_from_bins(counts, conf, pos),
    }
    both = (n_ai > 0) & (n_real > 0)
    out["bal_acc"] = np.where(both, (out["real_acc"] + out["fake_acc"]) / 2, np.nan)
    # the ROC from (0, 0): a first column of zeros, then every distinct threshold (float32: memory-bound passes)
    tpr = np.zeros((w.shape[0], tp.shape[1] + 1), dtype=np.float32)
    fpr = np.zeros_like(tpr)
    np.divide(tp, np.where(n_ai > 0, n_ai, 1).astype(np.float32)[:, None], out=tpr[:, 1:])
    np.divide(fp, np.where(n_real > 0, n_real, 1).astype(np.float32)[:, None], out=fpr[:, 1:])
    d_tpr = np.diff(tpr, axis=1)
    area = (np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1])).sum(axis=1, dtype=np.float64) / 2
    out["auc"] = np.where(both, area, np.nan)
    # AP as scikit-learn sums it: the recall gained at each threshold x the precision there (a
    # threshold no resampled image reaches yet gains no recall; max(., 1) keeps its 0/0 out)
    precision = tp / np.maximum(tp + fp, 1.0)
    out["ap"] = np.where(both, (d_tpr * precision).sum(axis=1, dtype=np.float64), np.nan)
    out["eer"] = np.where(both, eer(fpr, tpr), np.nan)
    for key, x in FPR_POINTS.items():
        out[key] = np.where(both, tpr_at_fpr(fpr, tpr, x), np.nan)
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def resampled_metrics(
    scores: np.ndarray, labels: np.ndarray, resamples: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """ALL_METRICS on `resamples` class-stratified resamples of one generator's images: key -> [resamples]."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, y = np.asarray(scores, dtype=np.float64)[order], np.asarray(labels, dtype=np.int64)[order]
    chunk = max(1, _CHUNK_CELLS // max(1, s.size))
    parts = [
        weighted_metrics(s, y, class_stratified_counts(y, min(chunk, resamples - start), rng))
        for start in range(0, resamples, chunk)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in ALL_METRICS}


def generator_stream(seed: int, generator: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(generator.encode()),)))


def bootstrap_intervals(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    generators: Sequence[str],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    trained: Collection[str] | None = None,
    level: float = LEVEL,
) -> dict[str, dict[str, list[float]]]:
    """row -> metric -> [low, high]: the `level` percentile interval of each generator's metrics,
    of their MEAN and (when `trained` leaves some out) of the MEAN_UNSEEN, as `per_generator_metrics` lays them out."""
    s, y, g = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64), np.asarray(generators)
    names = sorted(set(g.tolist()))
    draws = {name: resampled_metrics(s[g == name], y[g == name], resamples, generator_stream(seed, name))
             for name in names}  # fmt: skip
    rows = {name: draws[name] for name in names}
    if names:
        rows[MEAN] = _mean_of_draws([draws[n] for n in names])
    unseen = unseen_generators(names, trained)
    if unseen:
        rows[MEAN_UNSEEN] = _mean_of_draws([draws[n] for n in unseen])
    tail = 100 * (1 - level) / 2
    return {row: {k: _percentiles(v[k], tail) for k in ALL_METRICS} for row, v in rows.items()}


def _mean_of_draws(draws: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per resample, the unweighted mean over generators ignoring NaN (a one-class generator's AUC), as the table's mean."""
    out = {}
    for k in ALL_METRICS:
        stack = np.vstack([d[k] for d in draws])
        finite = ~np.isnan(stack)
        n = finite.sum(axis=0)
        out[k] = np.divide(
            np.where(finite, stack, 0.0).sum(axis=0), n, out=np.full(stack.shape[1], np.nan), where=n > 0
        )
    return out


def _percentiles(values: np.ndarray, tail: float) -> list[float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]


def describe(resamples: int, seed: int, level: float = LEVEL) -> dict[str, Any]:
    """The eval JSON's `bootstrap` entry: how its `ci` intervals were made."""
    return {"resamples": resamples, "seed": seed, "level": level, "method": METHOD}
