"""Metrics beyond accuracy (balanced accuracy, EER, TPR at FPR, ECE, NLL), their bootstrap
intervals, and the mean over the generators a model was not trained on.

Each metric is checked against scikit-learn or a direct computation written differently from the
code's (loops over ROC segments and calibration bins), on score sets with ties, perfect and
inverted separation and one score for everything.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from ds_trainer.bootstrap import (
    bootstrap_intervals,
    class_stratified_counts,
    generator_stream,
    resampled_metrics,
    weighted_metrics,
)
from ds_trainer.detection_metrics import ECE_BINS, EXTRA_METRICS, FPR_POINTS
from ds_trainer.metrics import (
    ALL_METRICS,
    MEAN,
    MEAN_UNSEEN,
    binary_metrics,
    format_protocol_table,
    per_generator_metrics,
)


def score_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(300, int), np.ones(200, int)]
    overlap = 1 / (1 + np.exp(-(rng.normal(size=500) + 1.2 * (2 * y - 1))))
    return {
        "overlapping": (overlap, y),
        "ties": (np.round(overlap, 1), y),  # 11 distinct scores: long vertical and diagonal segments
        "perfect": (np.where(y == 1, 0.6 + 0.4 * rng.random(500), 0.4 * rng.random(500)), y),
        "inverted": (np.where(y == 1, 0.1, 0.9) + 0.0, y),
        "one score": (np.full(500, 0.5), y),
        "few": (np.array([0.9, 0.8, 0.8, 0.3, 0.7, 0.2, 0.05]), np.array([1, 1, 0, 1, 0, 0, 0])),
        "clipped": (np.r_[np.zeros(5), np.ones(5), rng.random(10)], np.r_[np.ones(5, int), np.zeros(5, int), rng.integers(0, 2, 10)]),
    }  # fmt: skip


def direct_eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Walk the ROC's segments; on the one where FNR - FPR changes sign, solve FPR = FNR on it."""
    for a in range(len(fpr) - 1):
        x0, x1, fnr0, fnr1 = fpr[a], fpr[a + 1], 1 - tpr[a], 1 - tpr[a + 1]
        d0, d1 = fnr0 - x0, fnr1 - x1
        if d0 > 0 and d1 <= 0:
            t = d0 / (d0 - d1)
            return float(x0 + t * (x1 - x0))
        if d0 == 0:
            return float(x0)
    raise AssertionError("no crossing")


def direct_tpr_at(fpr: np.ndarray, tpr: np.ndarray, x: float) -> float:
    """The highest TPR at FPR = x on the piecewise-linear ROC: over points at FPR <= x and every
    segment crossing x."""
    best = max(t for f, t in zip(fpr, tpr) if f <= x)
    for a in range(len(fpr) - 1):
        if fpr[a] <= x < fpr[a + 1]:
            best = max(best, tpr[a] + (x - fpr[a]) / (fpr[a + 1] - fpr[a]) * (tpr[a + 1] - tpr[a]))
    return float(best)


def direct_ece(s: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> float:
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (s >= lo) & ((s < hi) if b < n_bins - 1 else (s <= hi))
        if inside.any():
            total += inside.mean() * abs(s[inside].mean() - y[inside].mean())
    return total


def direct_nll(s: np.ndarray, y: np.ndarray) -> float:
    eps = np.finfo(np.float64).eps
    p = np.clip(s, eps, 1 - eps)
    return float(np.mean([-math.log(pi) if yi == 1 else -math.log(1 - pi) for pi, yi in zip(p, y)]))


@pytest.mark.unit
@pytest.mark.parametrize("name", list(score_sets()))
def test_each_metric_matches_scikit_learn_or_a_direct_computation(name):
    s, y = score_sets()[name]
    m = binary_metrics(s, y)
    assert set(m) == set(ALL_METRICS)
    pred = (s >= 0.5).astype(int)
    assert m["bal_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, s)) and m["ap"] == pytest.approx(average_precision_score(y, s))
    assert m["nll"] == pytest.approx(log_loss(y, s, labels=[0, 1])) and m["nll"] == pytest.approx(direct_nll(s, y))
    assert m["ece"] == pytest.approx(direct_ece(s, y), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert m["eer"] == pytest.approx(direct_eer(fpr, tpr), abs=1e-12)
    for key, x in FPR_POINTS.items():
        assert m[key] == pytest.approx(direct_tpr_at(fpr, tpr, x), abs=1e-12), key


@pytest.mark.unit
def test_the_extremes_give_the_textbook_values():
    sets = score_sets()
    perfect = binary_metrics(*sets["perfect"])
    assert (perfect["eer"], perfect["tpr_at_fpr_1pct"], perfect["bal_acc"], perfect["auc"]) == (0.0, 1.0, 1.0, 1.0)
    inverted = binary_metrics(*sets["inverted"])
    assert (inverted["eer"], inverted["tpr_at_fpr_5pct"], inverted["bal_acc"]) == (1.0, 0.0, 0.0)
    flat = binary_metrics(*sets["one score"])  # the chance diagonal: TPR = FPR everywhere
    assert flat["eer"] == pytest.approx(0.5) and flat["tpr_at_fpr_1pct"] == pytest.approx(0.01)
    assert flat["tpr_at_fpr_5pct"] == pytest.approx(0.05) and flat["ece"] == pytest.approx(0.5 - 0.4)
    # one class: nothing that needs both is defined, calibration still is
    one = binary_metrics([0.9, 0.7, 0.2], [1, 1, 1])
    assert all(math.isnan(one[k]) for k in ("bal_acc", "eer", *FPR_POINTS, "auc", "ap"))
    assert one["nll"] == pytest.approx(direct_nll(np.array([0.9, 0.7, 0.2]), np.ones(3)))
    assert all(math.isnan(v) for v in binary_metrics([], []).values())


@pytest.mark.unit
@pytest.mark.parametrize("name", ["overlapping", "ties", "few", "clipped", "perfect"])
def test_resampled_metrics_are_the_metrics_of_the_images_repeated(name):
    s, y = score_sets()[name]
    counts = class_stratified_counts(y, 6, np.random.default_rng(3))
    assert (counts[:, y == 0].sum(axis=1) == (y == 0).sum()).all()  # every resample keeps each class's size
    assert (counts[:, y == 1].sum(axis=1) == (y == 1).sum()).all()
    got = weighted_metrics(s, y, counts)
    for b, c in enumerate(counts.astype(int)):
        want = binary_metrics(np.repeat(s, c), np.repeat(y, c))
        for k in ALL_METRICS:
            assert got[k][b] == pytest.approx(want[k], abs=2e-6, nan_ok=True), (k, b)
        # and scikit-learn with the counts as sample weights
        pred = (s >= 0.5).astype(int)
        assert got["auc"][b] == pytest.approx(roc_auc_score(y, s, sample_weight=c), abs=2e-6)
        assert got["ap"][b] == pytest.approx(average_precision_score(y, s, sample_weight=c), abs=2e-6)
        assert got["acc"][b] == pytest.approx(accuracy_score(y, pred, sample_weight=c))
        assert got["bal_acc"][b] == pytest.approx(balanced_accuracy_score(y, pred, sample_weight=c))
        assert got["nll"][b] == pytest.approx(log_loss(y, s, sample_weight=c, labels=[0, 1]), rel=1e-6)
    # weights of one: the point estimates
    once = weighted_metrics(s, y, np.ones((1, len(s))))
    point = binary_metrics(s, y)
    for k in ALL_METRICS:
        assert once[k][0] == pytest.approx(point[k], abs=2e-6, nan_ok=True), k


def synthetic(rng: np.random.Generator, n: int, d: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """n real and n AI images, logits N(-d/2, 1) and N(d/2, 1): true AUC = Phi(d / sqrt 2), accuracy
    at 0.5 = Phi(d / 2) for both classes, EER = Phi(-d / 2)."""
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    return 1 / (1 + np.exp(-(rng.normal(size=2 * n) + d * (y - 0.5)))), y


@pytest.mark.unit
def test_the_95_percent_intervals_cover_the_true_values_at_about_the_nominal_rate():
    d = 1.0
    truth = {"auc": norm.cdf(d / math.sqrt(2)), "acc": norm.cdf(d / 2), "bal_acc": norm.cdf(d / 2),
             "fake_acc": norm.cdf(d / 2), "eer": norm.cdf(-d / 2)}  # fmt: skip
    rng = np.random.default_rng(2024)
    reps = 200
    hits = {(row, k): 0 for row in ("a", MEAN) for k in truth}
    for rep in range(reps):
        (sa, ya), (sb, yb) = synthetic(rng, 150, d), synthetic(rng, 100, d)
        ci = bootstrap_intervals(np.r_[sa, sb], np.r_[ya, yb], ["a"] * len(sa) + ["b"] * len(sb),
                                 resamples=400, seed=rep)  # fmt: skip
        for row, k in hits:
            lo, hi = ci[row][k]
            hits[row, k] += lo <= truth[k] <= hi
    rates = {key: n / reps for key, n in hits.items()}
    assert all(0.88 <= r <= 0.99 for r in rates.values()), rates


@pytest.mark.unit
def test_intervals_are_seeded_and_one_generator_does_not_move_anothers():
    rng = np.random.default_rng(0)
    (sa, ya), (sb, yb) = synthetic(rng, 80), synthetic(rng, 60)
    s, y, g = np.r_[sa, sb], np.r_[ya, yb], ["a"] * 160 + ["b"] * 120
    first = bootstrap_intervals(s, y, g, resamples=300, seed=5)
    assert bootstrap_intervals(s, y, g, resamples=300, seed=5) == first
    other = bootstrap_intervals(s, y, g, resamples=300, seed=6)
    assert other["a"]["auc"] != first["a"]["auc"]
    alone = bootstrap_intervals(sa, ya, ["a"] * 160, resamples=300, seed=5)
    assert alone["a"] == first["a"]  # each generator draws from its own (seed, name) stream
    for row in ("a", "b", MEAN):
        assert set(first[row]) == set(ALL_METRICS)
        for k, (lo, hi) in first[row].items():
            assert lo <= hi, (row, k)
    point = per_generator_metrics(s, y, g)
    for row in ("a", "b", MEAN):  # a point estimate sits inside its own interval
        for k in ("auc", "acc", "bal_acc", "ap"):
            assert first[row][k][0] <= point[row][k] <= first[row][k][1], (row, k)


@pytest.mark.unit
def test_the_unseen_mean_is_the_mean_of_exactly_the_untrained_generators_cells():
    rng = np.random.default_rng(1)
    parts = {name: synthetic(rng, 40 + 10 * i, d=0.5 + i) for i, name in enumerate(["adm", "glide", "sdv14", "vqdm"])}
    s = np.concatenate([p[0] for p in parts.values()])
    y = np.concatenate([p[1] for p in parts.values()])
    g = [name for name, p in parts.items() for _ in p[1]]
    table = per_generator_metrics(s, y, g, trained=["sdv14", "midjourney"])  # midjourney is not evaluated
    assert list(table) == ["adm", "glide", "sdv14", "vqdm", MEAN, MEAN_UNSEEN]
    for k in ALL_METRICS:
        assert table[MEAN_UNSEEN][k] == pytest.approx(np.mean([table[n][k] for n in ("adm", "glide", "vqdm")]))
        assert table[MEAN][k] == pytest.approx(np.mean([table[n][k] for n in parts]))
    assert MEAN_UNSEEN not in per_generator_metrics(s, y, g)  # trained generators not known
    assert MEAN_UNSEEN not in per_generator_metrics(s, y, g, trained=list(parts))  # every one seen
    everything_unseen = per_generator_metrics(s, y, g, trained=[])  # zero-shot: nothing trained
    assert everything_unseen[MEAN_UNSEEN] == everything_unseen[MEAN]

    ci = bootstrap_intervals(s, y, g, resamples=200, seed=3, trained=["sdv14"])
    draws = {n: resampled_metrics(*parts[n], 200, generator_stream(3, n)) for n in parts}
    for k in ("auc", "eer", "nll"):
        per_resample = np.mean([draws[n][k] for n in ("adm", "glide", "vqdm")], axis=0)
        assert ci[MEAN_UNSEEN][k] == pytest.approx(list(np.percentile(per_resample, [2.5, 97.5])))
    assert MEAN_UNSEEN not in bootstrap_intervals(s, y, g, resamples=50, trained=list(parts))


@pytest.mark.unit
def test_the_printed_tables_hold_every_metric_the_means_and_the_intervals():
    rng = np.random.default_rng(4)
    (sa, ya), (sb, yb) = synthetic(rng, 50), synthetic(rng, 50)
    s, y, g = np.r_[sa, sb], np.r_[ya, yb], ["adm"] * 100 + ["glide"] * 100
    table = per_generator_metrics(s, y, g, trained=["adm"])
    ci = bootstrap_intervals(s, y, g, resamples=100, trained=["adm"])
    text = format_protocol_table(table, ci)
    first, second = text.split("\n\n")
    assert first.splitlines()[0].split() == ["generator", "acc", "real_acc", "fake_acc", "ap", "auc"]
    assert second.splitlines()[0].split() == ["generator", "bal_acc", "eer", "tpr@fpr1%", "tpr@fpr5%", "ece", "nll"]
    unseen = next(line for line in second.splitlines() if line.startswith(MEAN_UNSEEN))
    lo, hi = ci[MEAN_UNSEEN]["nll"]
    assert unseen.endswith(f"{table[MEAN_UNSEEN]['nll']:.3f} [{lo:.3f}, {hi:.3f}]")
    adm = next(line for line in first.splitlines() if line.startswith("adm"))
    lo, hi = ci["adm"]["auc"]
    assert adm.endswith(f"{100 * table['adm']['auc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
    assert len(EXTRA_METRICS) == 6


@pytest.mark.bench
def test_bootstrap_of_eight_generators_of_ten_thousand_images_is_fast():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 40_000)
    g = np.repeat([f"g{i}" for i in range(8)], 10_000)
    s = 1 / (1 + np.exp(-(rng.normal(size=y.size) + 1.5 * (2 * y - 1))))
    start = time.process_time()
    ci = bootstrap_intervals(s, y, g, resamples=1000, seed=0, trained=["g0", "g1"])
    cpu = time.process_time() - start
    print(f"bootstrap, 8 generators x 10,000 images x 1000 resamples: {cpu:.1f} s CPU")
    assert set(ci) == {*(f"g{i}" for i in range(8)), MEAN, MEAN_UNSEEN}
    assert cpu < 30
