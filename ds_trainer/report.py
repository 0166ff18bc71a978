"""The evaluation report: PNG figures and one self-contained HTML page from `ds-trainer eval` results.

`ds-trainer eval` writes the protocol table *and* every image's score (`predictions`); this module
turns one or more of those files (several runs are overlaid: full fine-tune vs linear probe vs
LoRA) and, optionally, the runs' `metrics.jsonl`/`steps.jsonl` into:

- `roc.png`: ROC curves per generator plus the mean, AUC in the legend;
- `scores.png`: histograms of P(AI) for real and fake images per generator, the threshold marked;
- `accuracy.png`: accuracy, real accuracy and fake accuracy per generator, with the mean;
- `confusion.png`: the confusion matrix at the threshold;
- `training.png`: losses, val AUC, LR and samples/s against steps (when runs are given);
- `report.html`: all of it with the metrics table, the resolved config and the checkpoint, images
  embedded (no network access needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ds_trainer.errors import ConfigError, DataError
from ds_trainer.metrics import PROTOCOL_METRICS

MEAN = "mean"
METRIC_LABELS = {"acc": "accuracy", "real_acc": "real accuracy", "fake_acc": "fake accuracy", "ap": "AP", "auc": "AUC"}


@dataclass
class EvalRun:
    """One `ds-trainer eval` result with its per-image predictions."""

    name: str
    path: Path
    result: dict[str, Any]
    scores: np.ndarray  # P(AI-generated) per image
    labels: np.ndarray  # 1 = AI-generated, 0 = real
    generators: np.ndarray  # generator name per image
    run_dir: Path | None = None
    curves: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
    steps: list[dict[str, Any]] = field(default_factory=list)  # steps.jsonl rows

    @property
    def generator_names(self) -> list[str]:
        return sorted(set(self.generators.tolist()))

    def table(self) -> dict[str, dict[str, float]]:
        """Per-generator protocol metrics and their mean, as `ds-trainer eval` computed them."""
        table = self.result.get("generators") or {}
        return {g: {k: _num(v) for k, v in row.items()} for g, row in table.items()}


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def predictions_block(scores: np.ndarray, labels: np.ndarray, generators: Sequence[str] | None) -> dict[str, Any]:
    """The compact `predictions` entry of an eval JSON: generator names once, an index per image."""
    names = sorted(set(generators)) if generators else []
    index = {g: i for i, g in enumerate(names)}
    return {
        "generators": names,
        "generator": [index[g] for g in generators] if generators else [],
        "label": [int(v) for v in labels],
        "score": [round(float(v), 6) for v in scores],
    }


def load_eval(path: str | Path, name: str | None = None) -> EvalRun:
    """Read an eval JSON written by `ds-trainer eval`; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--eval {path}: no such file (write one with `ds-trainer eval ... --out {path}`)")
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"--eval {path}: not JSON ({exc})") from exc
    pred = result.get("predictions") if isinstance(result, dict) else None
    if not isinstance(pred, dict) or not all(k in pred for k in ("score", "label", "generator", "generators")):
        raise DataError(
            f"--eval {path}: no per-image predictions in it; re-run `ds-trainer eval` (it writes them since "
            "the report exists)"
        )
    scores = np.asarray(pred["score"], dtype=np.float64)
    labels = np.asarray(pred["label"], dtype=np.int64)
    names = list(pred["generators"])
    gen_index = np.asarray(pred["generator"], dtype=np.int64)
    if not (len(scores) == len(labels) == len(gen_index)) or len(scores) == 0:
        raise DataError(f"--eval {path}: predictions have {len(scores)} scores, {len(labels)} labels, "
                        f"{len(gen_index)} generators; they must be equal and non-zero")
    if names and (gen_index.min() < 0 or gen_index.max() >= len(names)):
        raise DataError(f"--eval {path}: a generator index is outside its {len(names)} names")
    generators = np.asarray(names, dtype=object)[gen_index] if names else np.full(len(scores), "all", dtype=object)
    return EvalRun(name or _default_name(path, result), path, result, scores, labels, generators)


def _default_name(path: Path, result: dict[str, Any]) -> str:
    ckpt = result.get("checkpoint")
    if ckpt:
        ckpt = Path(ckpt)
        return f"{ckpt.parent.parent.name or ckpt.parent.name}/{ckpt.name}"
    return path.stem


def attach_run(run: EvalRun, run_dir: str | Path) -> None:
    """Training curves for `run` from a run directory's metrics.jsonl (and steps.jsonl, if any)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"--run {run_dir}: no metrics.jsonl in it (a run_dir written by ds-trainer train)")
    run.run_dir = run_dir
    run.curves = _jsonl(metrics)
    steps = run_dir / "steps.jsonl"
    run.steps = _jsonl(steps) if steps.is_file() else []


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not a JSON line ({exc})") from exc
    return rows


# ---------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, width: float = 4.2, height: float = 3.6, max_cols: int = 4):
    plt = _plt()
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


def _mean_roc(run: EvalRun) -> tuple[np.ndarray, np.ndarray, float] | None:
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
        mean = _mean_roc(run)
        if mean is not None:
            ax.plot(mean[0], mean[1], "k--", lw=2, label=f"{MEAN} (AUC {mean[2]:.3f})")
        _roc_axes(ax, run.name)
    else:
        names = _union_generators(runs) + [MEAN]
        fig, axes = _panels(len(names))
        for ax, g in zip(axes, names):
            for run in runs:
                if g == MEAN:
                    roc = _mean_roc(run)
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
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (real called AI)",
           ylabel="true positive rate (AI caught)", title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)


def _union_generators(runs: Sequence[EvalRun]) -> list[str]:
    return sorted({g for run in runs for g in run.generator_names})


def score_figure(runs: Sequence[EvalRun], threshold: float = 0.5):
    """Histograms of P(AI) for real vs fake images: a row per run, a panel per generator."""
    plt = _plt()
    gens = _union_generators(runs)
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
    """Accuracy, real accuracy and fake accuracy per generator and their mean; a bar per run."""
    gens = _union_generators(runs) + [MEAN]
    fig, axes = _panels(3, width=max(4.5, 0.9 * len(gens) * max(1, len(runs)) ** 0.5 + 2), max_cols=1, height=3.0)
    width = 0.8 / len(runs)
    x = np.arange(len(gens))
    for ax, key in zip(axes, ("acc", "real_acc", "fake_acc")):
        for i, run in enumerate(runs):
            table = run.table()
            values = [table.get(g, {}).get(key, math.nan) for g in gens]
            bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, np.nan_to_num(values), width, label=run.name)
            for bar, v in zip(bars, values):
                if not math.isnan(v):
                    ax.annotate(f"{100 * v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=6)
        ax.axvline(len(gens) - 1.5, color="0.6", lw=0.8)
        ax.set(ylim=(0, 1.12), ylabel=METRIC_LABELS[key], xticks=x)
        ax.set_xticklabels(gens, rotation=20, ha="right", fontsize=8)
        if len(runs) > 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def confusion_counts(run: EvalRun, threshold: float = 0.5) -> np.ndarray:
    """[[real called real, real called AI], [AI called real, AI called AI]] at `threshold`."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(run.labels, (run.scores >= threshold).astype(int), labels=[0, 1])


def confusion_figure(runs: Sequence[EvalRun], threshold: float = 0.5):
    fig, axes = _panels(len(runs), 3.8, 3.6)
    for ax, run in zip(axes, runs):
        cm = confusion_counts(run, threshold)
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            share = v / max(1, cm[i].sum())
            ax.text(j, i, f"{v}\n{100 * share:.1f}%", ha="center", va="center",
                    color="white" if v > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["real", "AI"], yticklabels=["real", "AI"],
               xlabel=f"predicted (P(AI) ≥ {threshold:g})", ylabel="true", title=run.name)
    fig.tight_layout()
    return fig


def training_figure(runs: Sequence[EvalRun]):
    """Losses, val AUC, LR and samples/s against optimizer steps, one colour per run."""
    fig, axes = _panels(4, 4.6, 3.4, max_cols=2)
    ax_loss, ax_auc, ax_lr, ax_speed = axes
    for i, run in enumerate(r for r in runs if r.curves):
        color = f"C{i}"
        rows = run.curves
        steps = [r.get("step") for r in rows]
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            pts = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
            if pts:
                ax_loss.plot(*zip(*pts), style, color=color, marker="o", ms=3, label=f"{run.name} {key}")
        pts = [(s, r["val_auc"]) for s, r in zip(steps, rows) if r.get("val_auc") is not None]
        if pts:
            ax_auc.plot(*zip(*pts), color=color, marker="o", ms=3, label=run.name)
        lr = [(r["step"], r["train/lr"]) for r in run.steps if r.get("train/lr") is not None]
        if not lr:
            lr = [(s, r["lr"]) for s, r in zip(steps, rows) if r.get("lr") is not None]
        if lr:
            ax_lr.plot(*zip(*lr), color=color, label=run.name)
        pts = [(s, r["samples_per_s"]) for s, r in zip(steps, rows) if r.get("samples_per_s") is not None]
        if pts:
            ax_speed.plot(*zip(*pts), color=color, marker="o", ms=3, label=run.name)
    for ax, title in ((ax_loss, "loss"), (ax_auc, "validation AUC"), (ax_lr, "learning rate"),
                      (ax_speed, "training samples/s")):
        ax.set(xlabel="optimizer step", title=title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ output
@dataclass
class Report:
    out_dir: Path
    html: Path
    figures: dict[str, Path]


def build_figures(runs: Sequence[EvalRun], threshold: float = 0.5) -> dict[str, Any]:
    """name → matplotlib figure, in the order the page shows them."""
    figures = {
        "roc": roc_figure(runs),
        "scores": score_figure(runs, threshold),
        "accuracy": accuracy_figure(runs),
        "confusion": confusion_figure(runs, threshold),
    }
    if any(run.curves for run in runs):
        figures["training"] = training_figure(runs)
    return figures


def write_report(runs: Sequence[EvalRun], out_dir: str | Path, threshold: float = 0.5,
                 tensorboard: str | Path | None = None) -> Report:
    """Every figure as `<name>.png` in `out_dir`, and `report.html` with them embedded; with
    `tensorboard`, the same figures and the PR curves go to that log dir too."""
    if not runs:
        raise ConfigError("report: give at least one --eval RESULTS.json")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"report: --threshold {threshold} must be between 0 and 1")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"report: two runs share a name ({', '.join(names)}); name them with --name")
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    pngs: dict[str, bytes] = {}
    figures = build_figures(runs, threshold)
    for name, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        pngs[name] = buf.getvalue()
        paths[name] = out / f"{name}.png"
        paths[name].write_bytes(pngs[name])
    if tensorboard is not None:
        log_to_tensorboard(runs, tensorboard, threshold=threshold, figures=figures)
    for fig in figures.values():
        plt.close(fig)
    page = out / "report.html"
    page.write_text(render_html(runs, pngs, threshold))
    return Report(out, page, paths)


FIGURE_TITLES = {
    "roc": "ROC curves per generator",
    "scores": "Scores of real and AI-generated images",
    "accuracy": "Accuracy per generator",
    "confusion": "Confusion matrix",
    "training": "Training curves",
}

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.9rem}th,td{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child,th.run,td.run{text-align:left}tr.mean td{font-weight:600;border-top:2px solid #999}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:.8rem;
overflow:auto;font-size:.8rem}.muted{color:#777}
"""

# Records, in the DOM, which embedded images decoded (the browser test reads it back).
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-images-loaded', ok.length);
});
"""


def render_html(runs: Sequence[EvalRun], pngs: dict[str, bytes], threshold: float = 0.5) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>ds_trainer evaluation report</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        "<h1>AI-generated image detection: evaluation report</h1>",
        (
            "<h2>Runs</h2><table id='runs'><tr><th>run</th><th>checkpoint</th><th>epoch</th><th>step</th>"
            "<th>split</th><th>images</th><th>unreadable</th></tr>"
        ),
    ]
    for run in runs:
        r = run.result
        parts.append(
            f"<tr><td class='run'>{e(run.name)}</td><td class='run'>{e(str(r.get('checkpoint', '')))}</td>"
            f"<td>{e(str(r.get('epoch', '')))}</td><td>{e(str(r.get('global_step', '')))}</td>"
            f"<td>{e(str(r.get('split', '')))}</td><td>{len(run.scores)}</td><td>{e(str(r.get('bad_samples', 0)))}</td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<h2>Metrics per generator</h2><p class='muted'>threshold {threshold:g} on P(AI-generated); "
                 "the mean is the unweighted mean over generators (the GenImage protocol).</p>")
    parts.append(metrics_table_html(runs))
    for name, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{e(FIGURE_TITLES.get(name, name))}</h2><figure><img id='fig-{e(name)}' "
                     f"alt='{e(FIGURE_TITLES.get(name, name))}' src='data:image/png;base64,{data}'></figure>")
    parts.append("<h2>Configuration</h2>")
    for run in runs:
        config = run.result.get("config")
        text = yaml.safe_dump(config, sort_keys=False) if config else "(not recorded in this eval result)"
        parts.append(f"<h3>{e(run.name)}</h3><p class='muted'>checkpoint {e(str(run.result.get('checkpoint', '')))}"
                     f"</p><pre>{e(text)}</pre>")
    parts.append("</body></html>\n")
    return "".join(parts)


def metrics_table_html(runs: Sequence[EvalRun]) -> str:
    e = html.escape
    multi = len(runs) > 1
    head = "<tr><th>generator</th>" + ("<th class='run'>run</th>" if multi else "")
    head += "".join(f"<th>{e(METRIC_LABELS[k])}</th>" for k in PROTOCOL_METRICS) + "<th>images</th></tr>"
    rows = [f"<table id='metrics'>{head}"]
    for g in _union_generators(runs) + [MEAN]:
        for run in runs:
            metrics = run.table().get(g)
            if metrics is None:
                continue
            n = int((run.generators == g).sum()) if g != MEAN else len(run.scores)
            cells = "".join(f"<td>{'n/a' if math.isnan(metrics.get(k, math.nan)) else f'{100 * metrics[k]:.1f}'}</td>"
                            for k in PROTOCOL_METRICS)
            cls = " class='mean'" if g == MEAN else ""
            rows.append(f"<tr{cls}><td>{e(g)}</td>" + (f"<td class='run'>{e(run.name)}</td>" if multi else "")
                        + f"{cells}<td>{n}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def log_to_tensorboard(runs: Sequence[EvalRun], log_dir: str | Path, step: int | None = None,
                       threshold: float = 0.5, figures: dict[str, Any] | None = None) -> None:
    """PR curves per generator (`pr/<generator>`, `pr/<run>/<generator>` for several runs) and the
    figures as images (`report/<name>`); `figures` are drawn here unless given."""
    from torch.utils.tensorboard import SummaryWriter

    from ds_trainer.sinks import add_pr_curves

    plt = _plt()
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for run in runs:
            at = int(step if step is not None else run.result.get("global_step") or 0)
            add_pr_curves(writer, at, run.scores, run.labels, run.generators,
                          prefix=f"pr/{run.name}" if len(runs) > 1 else "pr")  # fmt: skip
        at = int(step if step is not None else runs[0].result.get("global_step") or 0)
        for name, fig in (figures if figures is not None else build_figures(runs, threshold)).items():
            writer.add_figure(f"report/{name}", fig, global_step=at, close=figures is None)
    finally:
        writer.close()
        if figures is None:
            plt.close("all")
