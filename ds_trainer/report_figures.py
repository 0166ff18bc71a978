"""The report's matplotlib figures: ROC, precision-recall, score histograms, accuracy bars (with
bootstrap error bars), confusion matrix, reliability diagram (report_uncertainty), training curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ds_trainer.eval_results import MEAN, MEAN_ROWS, MEAN_UNSEEN, METRIC_LABELS, EvalRun, union_generators
from ds_trainer.report_robustness import has_robustness, robustness_figure
from ds_trainer.report_uncertainty import error_bars, reliability_figure, table_rows


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported only when a figure is drawn (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def plain_text() -> Any:
    """A context in which every text matplotlib makes is drawn as written, never parsed as mathtext.

    Generator and run names are user data: `sd$\\frac$` would otherwise be parsed (and crash),
    `a$b$c` lose its dollars. Text objects take the setting when they are made, and tick labels are
    made while a figure is drawn, so building *and* saving a figure both belong inside it.
    """
    return pyplot().rc_context({"text.parse_math": False})


def _panels(n: int, width: float = 4.2, height: float = 3.6, max_cols: int = 4):
    plt = pyplot()
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    from sklearn.metrics import roc_auc_score, roc_curve

    if len(np.unique(labels)) < 2:
        return None  # one class: no ROC
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr, float(roc_auc_score(labels, scores))


def mean_roc(run: EvalRun) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Vertical average of the per-generator ROC curves; AUC = the protocol's mean AUC."""
    grid = np.linspace(0.0, 1.0, 201)
    tprs, aucs = [], []
    for g in run.generator_names:
        mask = run.generators == g
        roc = _roc(run.scores[mask], run.labels[mask])
        if roc is not None:
            tprs.append(np.interp(grid, roc[0], roc[1]))
            aucs.append(roc[2])
    if not tprs:
        return None
    tpr = np.mean(tprs, axis=0)
    tpr[0] = 0.0
    return grid, tpr, float(np.mean(aucs))


def roc_figure(runs: Sequence[EvalRun]):
    """One run: a line per generator plus the mean. Several: a panel per generator, a line per run."""
    if len(runs) == 1:
        (run,) = runs
        fig, (ax,) = _panels(1, 6.0, 5.2)
        for g in run.generator_names:
            mask = run.generators == g
            roc = _roc(run.scores[mask], run.labels[mask])
            if roc is not None:
                ax.plot(roc[0], roc[1], lw=1.2, label=f"{g} (AUC {roc[2]:.3f})")
        mean = mean_roc(run)
        if mean is not None:
            ax.plot(mean[0], mean[1], "k--", lw=2, label=f"{MEAN} (AUC {mean[2]:.3f})")
        _roc_axes(ax, run.name)
    else:
        names = [*union_generators(runs), MEAN]
        fig, axes = _panels(len(names))
        for ax, g in zip(axes, names):
            for run in runs:
                if g == MEAN:
                    roc = mean_roc(run)
                else:
                    mask = run.generators == g
                    roc = _roc(run.scores[mask], run.labels[mask]) if mask.any() else None
                if roc is not None:
                    ax.plot(roc[0], roc[1], lw=1.4, label=f"{run.name} (AUC {roc[2]:.3f})")
            _roc_axes(ax, g)
    fig.tight_layout()
    return fig


def _roc_axes(ax, title: str) -> None:
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="false positive rate (real called AI)",
        ylabel="true positive rate (AI caught)",
        title=title,
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)


def _pr(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    if len(np.unique(labels)) < 2:
        return None  # one class: AP is undefined (the table says n/a)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return recall, precision, float(average_precision_score(labels, scores))


def pr_figure(runs: Sequence[EvalRun]):
    """Precision (of "AI" calls) against recall (AI images caught), AP in the legend; laid out as
    `roc_figure`. No mean curve: the protocol's mean AP is a mean of numbers, not of curves."""
    if len(runs) == 1:
        (run,) = runs
        fig, (ax,) = _panels(1, 6.0, 5.2)
        for g in run.generator_names:
            mask = run.generators == g
            pr = _pr(run.scores[mask], run.labels[mask])
            if pr is not None:
                ax.plot(pr[0], pr[1], lw=1.2, drawstyle="steps-post", label=f"{g} (AP {pr[2]:.3f})")
        mean_ap = run.table().get(MEAN, {}).get("ap", math.nan)
        _pr_axes(ax, run.name if math.isnan(mean_ap) else f"{run.name}: mean AP {mean_ap:.3f}")
    else:
        fig, axes = _panels(len(union_generators(runs)))
        for ax, g in zip(axes, union_generators(runs)):
            for run in runs:
                mask = run.generators == g
                pr = _pr(run.scores[mask], run.labels[mask]) if mask.any() else None
                if pr is not None:
                    ax.plot(pr[0], pr[1], lw=1.4, drawstyle="steps-post", label=f"{run.name} (AP {pr[2]:.3f})")
            _pr_axes(ax, g)
    fig.tight_layout()
    return fig


def _pr_axes(ax, title: str) -> None:
    ax.set(
        xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (AI caught)", ylabel="precision (AI calls that are AI)", title=title
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=7)


def score_figure(runs: Sequence[EvalRun], threshold: float = 0.5):
    """Histograms of P(AI) for real vs fake images: a row per run, a panel per generator."""
    plt = pyplot()
    gens = union_generators(runs)
    fig, axes = plt.subplots(len(runs), len(gens), figsize=(3.6 * len(gens), 2.9 * len(runs)), squeeze=False)
    bins = np.linspace(0.0, 1.0, 26)
    for r, run in enumerate(runs):
        for c, g in enumerate(gens):
            ax = axes[r][c]
            mask = run.generators == g
            ax.hist(run.scores[mask & (run.labels == 0)], bins=bins, alpha=0.6, color="tab:green", label="real")
            ax.hist(run.scores[mask & (run.labels == 1)], bins=bins, alpha=0.6, color="tab:red", label="AI-generated")
            ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
            ax.set(xlim=(0, 1), xlabel="P(AI-generated)", title=g if len(runs) == 1 else f"{run.name}\n{g}")
            if c == 0:
                ax.set_ylabel("images")
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def accuracy_figure(runs: Sequence[EvalRun]):
    """Accuracy, real accuracy and fake accuracy per generator and their means; a bar per run, with
    its 95 % bootstrap interval as an error bar when the eval computed them."""
    gens = table_rows(runs)
    fig, axes = _panels(3, width=max(4.5, 0.9 * len(gens) * max(1, len(runs)) ** 0.5 + 2), max_cols=1, height=3.0)
    width = 0.8 / len(runs)
    x = np.arange(len(gens))
    for ax, key in zip(axes, ("acc", "real_acc", "fake_acc")):
        for i, run in enumerate(runs):
            table = run.table()
            # percent, as the labels on the bars and the metrics table give them
            values = [100 * table.get(g, {}).get(key, math.nan) for g in gens]
            yerr = error_bars(run, key, gens, values)
            bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, np.nan_to_num(values), width, label=run.name,
                          yerr=yerr, error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.2"})  # fmt: skip
            for bar, v in zip(bars, values):
                if not math.isnan(v):
                    ax.annotate(
                        f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=6
                    )
        ax.axvline(len(union_generators(runs)) - 0.5, color="0.6", lw=0.8)  # generators | means
        ax.set(ylim=(0, 112), ylabel=f"{METRIC_LABELS[key]} (%)", xticks=x)
        ax.set_xticklabels(gens, rotation=20, ha="right", fontsize=8)
        if len(runs) > 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def confusion_counts(run: EvalRun, threshold: float = 0.5) -> np.ndarray:
    """[[real called real, real called AI], [AI called real, AI called AI]] at `threshold`."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(run.labels, (run.scores >= threshold).astype(int), labels=[0, 1])


def _luminance(rgb: Sequence[float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour (channels 0-1)."""
    c = np.asarray(rgb[:3], dtype=np.float64)
    c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2])


def readable_text_color(face: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with `face`: one of the two always reaches 4.5:1."""
    lum = _luminance(face)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def confusion_figure(runs: Sequence[EvalRun], threshold: float = 0.5):
    """Counts and row shares; a cell is shaded by its share of the true class, so a small class
    reads as clearly as a big one, and its text colour is picked against that shade."""
    fig, axes = _panels(len(runs), 3.8, 3.6)
    for ax, run in zip(axes, runs):
        cm = confusion_counts(run, threshold)
        shares = cm / np.maximum(1, cm.sum(axis=1, keepdims=True))
        # vmin/vmax fixed: without them the smallest cell is the colormap's white whatever its count
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                f"{v}\n{100 * shares[i, j]:.1f}%",
                ha="center",
                va="center",
                color=readable_text_color(image.to_rgba(shares[i, j])),
            )
        ax.set(
            xticks=[0, 1],
            yticks=[0, 1],
            xticklabels=["real", "AI"],
            yticklabels=["real", "AI"],
            xlabel=f"predicted (P(AI) ≥ {threshold:g})",
            ylabel="true",
            title=run.name,
        )
    fig.tight_layout()
    return fig


def _series_colors(i: int, n_runs: int) -> tuple[Any, Any]:
    """(train colour, val colour) of run `i`: two hues for one run; for several, a dark/light
    pair of one hue per run, so both the run and the split can be told apart."""
    if n_runs == 1:
        return "C0", "C1"
    pairs = pyplot().get_cmap("tab20")
    return pairs((2 * i) % 20), pairs((2 * i + 1) % 20)


def _epoch_points(run: EvalRun, key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    return [(r["step"], scale * r[key]) for r in run.curves if r.get("step") is not None and r.get(key) is not None]


def _has_generator_curves(run: EvalRun) -> bool:
    return any(r.get("val_generators") for r in run.curves)


def training_figure(runs: Sequence[EvalRun]):
    """Against optimizer steps: train loss per logged step and per epoch with the val loss, train and
    val accuracy, val AUC, a panel per run of val AUC per generator, LR and samples/s."""
    runs = [r for r in runs if r.curves]
    per_generator = [r for r in runs if _has_generator_curves(r)]
    fig, axes = _panels(5 + len(per_generator), 4.6, 3.4, max_cols=2)
    ax_loss, ax_acc, ax_auc, *ax_gens, ax_lr, ax_speed = axes
    for i, run in enumerate(runs):
        train_c, val_c = _series_colors(i, len(runs))
        who = f"{run.name} " if len(runs) > 1 else ""
        logged = [(r["step"], r["train/loss"]) for r in run.steps if r.get("train/loss") is not None]
        if logged:
            ax_loss.plot(*zip(*logged), color=train_c, lw=0.8, alpha=0.6, label=f"{who}train loss (logged steps)")
        pts = _epoch_points(run, "train_loss")
        if pts:
            # markers only when the logged steps already draw the line
            ax_loss.plot(
                *zip(*pts),
                ls="none" if logged else "-",
                color=train_c,
                marker="o",
                ms=4,
                label=f"{who}train loss (epoch mean)",
            )
        pts = _epoch_points(run, "val_loss")
        if pts:
            ax_loss.plot(*zip(*pts), "--", color=val_c, marker="o", ms=4, label=f"{who}val loss")
        for key, split, color, style in (("train_acc", "train", train_c, "-"), ("val_acc", "val", val_c, "--")):
            pts = _epoch_points(run, key, scale=100.0)
            if pts:
                ax_acc.plot(*zip(*pts), style, color=color, marker="o", ms=3, label=f"{who}{split} accuracy")
        pts = _epoch_points(run, "val_auc")
        if pts:
            ax_auc.plot(*zip(*pts), color=train_c, marker="o", ms=3, label=f"{who}val AUC (all images)")
        pts = _epoch_points(run, "val_mean_auc")
        if pts:
            ax_auc.plot(*zip(*pts), ":", color=train_c, marker="s", ms=3, label=f"{who}val AUC (mean over generators)")
        lr = [(r["step"], r["train/lr"]) for r in run.steps if r.get("train/lr") is not None]
        if not lr:
            lr = _epoch_points(run, "lr")
        if lr:
            ax_lr.plot(*zip(*lr), color=train_c, label=run.name)
        pts = _epoch_points(run, "samples_per_s")
        if pts:
            ax_speed.plot(*zip(*pts), color=train_c, marker="o", ms=3, label=run.name)
    gen_colors = {g: f"C{k % 10}" for k, g in enumerate(_curve_generators(per_generator))}
    for ax, run in zip(ax_gens, per_generator):
        for g, color in gen_colors.items():
            pts = [
                (r["step"], r["val_generators"][g]["auc"])
                for r in run.curves
                if (r.get("val_generators") or {}).get(g, {}).get("auc") is not None
            ]
            if pts:
                ax.plot(*zip(*pts), color=color, marker="o", ms=3, lw=1.2, label=g)
        for mean, style in ((MEAN, "k--"), (MEAN_UNSEEN, "k:")):
            pts = [
                (r["step"], r["val_generators"][mean]["auc"])
                for r in run.curves
                if (r.get("val_generators") or {}).get(mean, {}).get("auc") is not None
            ]
            if pts:
                ax.plot(*zip(*pts), style, marker="s", ms=3, lw=2, label=mean)
        ax.set(title=f"validation AUC per generator: {run.name}")
    ax_acc.set(ylabel="%")
    for ax, title in (
        (ax_loss, "loss"),
        (ax_acc, "accuracy"),
        (ax_auc, "validation AUC"),
        (ax_lr, "learning rate"),
        (ax_speed, "training samples/s"),
    ):
        ax.set(title=title)
    for ax in axes:
        ax.set(xlabel="optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if len(runs) == 1:
        fig.suptitle(runs[0].name)
    fig.tight_layout()
    return fig


def _curve_generators(runs: Sequence[EvalRun]) -> list[str]:
    """Generators named in any run's val_generators rows, sorted, without the mean."""
    return sorted(
        {g for run in runs for r in run.curves for g in (r.get("val_generators") or {}) if g not in MEAN_ROWS}
    )


def build_figures(runs: Sequence[EvalRun], threshold: float = 0.5) -> dict[str, Any]:
    """name → matplotlib figure, in the order the page shows them (draw or save them inside plain_text())."""
    with plain_text():
        return _build_figures(runs, threshold)


def _build_figures(runs: Sequence[EvalRun], threshold: float) -> dict[str, Any]:
    figures = {
        "roc": roc_figure(runs),
        "pr": pr_figure(runs),
        "scores": score_figure(runs, threshold),
        "accuracy": accuracy_figure(runs),
        "confusion": confusion_figure(runs, threshold),
        "calibration": reliability_figure(runs),
    }
    if has_robustness(runs):
        figures["robustness"] = robustness_figure(runs)
    if any(run.curves for run in runs):
        figures["training"] = training_figure(runs)
    return figures
