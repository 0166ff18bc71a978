"""The report's uncertainty and calibration: error bars from `ds-trainer eval`'s bootstrap
intervals, the rows a table or bar chart shows (generators, then the means), and the reliability
diagram on the same 15 bins as the ECE."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ds_trainer.detection_metrics import ECE_BINS, bin_sums, ece_from_bins
from ds_trainer.eval_results import MEAN, MEAN_ROWS, EvalRun, union_generators


def table_rows(runs: Sequence[EvalRun]) -> list[str]:
    """Every generator of any run, then each mean row that some run has (the unseen mean only
    where an eval knew what its checkpoint was trained on and some generators were not)."""
    return [*union_generators(runs), *(m for m in MEAN_ROWS if m == MEAN or any(m in r.table() for r in runs))]


def error_bars(run: EvalRun, key: str, rows: Sequence[str], values: Sequence[float]) -> np.ndarray | None:
    """[2, len(rows)] distances below and above each bar (in %) to its interval's ends; None
    when the eval has no intervals; zero for a row without one."""
    intervals = run.intervals()
    if not intervals:
        return None
    out = np.zeros((2, len(rows)))
    for i, (row, value) in enumerate(zip(rows, values)):
        lo, hi = intervals.get(row, {}).get(key, (math.nan, math.nan))
        if not (math.isnan(value) or math.isnan(lo) or math.isnan(hi)):
            out[:, i] = (max(0.0, value - 100 * lo), max(0.0, 100 * hi - value))
    return out


def reliability(scores: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean P(AI), share of AI images) of each non-empty bin, and the ECE they give."""
    counts, conf, pos = bin_sums(scores, labels, n_bins=n_bins)
    full = counts > 0
    return conf[full] / counts[full], pos[full] / counts[full], float(ece_from_bins(counts, conf, pos))


def reliability_figure(runs: Sequence[EvalRun]):
    """A panel per run: per generator, the share of AI images against the mean P(AI) in each of
    the ECE's 15 equal-width bins (on the diagonal: calibrated), ECE in the legend."""
    from ds_trainer.report_figures import _panels

    fig, axes = _panels(len(runs), 5.2, 4.6)
    for ax, run in zip(axes, runs):
        for g in run.generator_names:
            mask = run.generators == g
            conf, share, ece = reliability(run.scores[mask], run.labels[mask])
            ax.plot(conf, share, marker="o", ms=3, lw=1.2, label=f"{g} (ECE {100 * ece:.1f}%)")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":", label="_calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=f"mean P(AI) in the bin ({ECE_BINS} equal-width bins)",
               ylabel="share of AI-generated images", title=run.name)  # fmt: skip
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig
