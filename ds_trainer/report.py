"""The evaluation report: PNG figures and one self-contained HTML page from `ds-trainer eval` results.

`ds-trainer eval` writes the protocol table *and* every image's score (`predictions`); this module
turns one or more of those files (several runs are overlaid: full fine-tune vs linear probe vs
LoRA) and, optionally, the runs' `metrics.jsonl`/`steps.jsonl` into:

- `roc.png`: ROC curves per generator plus the mean, AUC in the legend;
- `pr.png`: precision-recall curves per generator, AP in the legend;
- `scores.png`: histograms of P(AI) for real and fake images per generator, the threshold marked;
- `accuracy.png`: accuracy, real accuracy and fake accuracy per generator, with the means and,
  when `ds-trainer eval` computed them, 95 % bootstrap intervals as error bars;
- `confusion.png`: the confusion matrix at the threshold;
- `robustness.png` (eval with `--perturb`): accuracy and AUC against the degradation level, a
  panel per kind, per generator and the mean; the page adds the per-level tables and, with
  `--align-jpeg` / `--size-matched`, each debiased track's own table (`ds_trainer.report_robustness`);
- a cross-dataset table (eval with several `--shards`): a row per shard set and generator, each
  set's mean and the mean over sets (`ds_trainer.report_datasets`);
- `calibration.png`: reliability diagram per run (share of AI images against mean P(AI) in the
  ECE's 15 bins, per generator);
- `training.png`: losses (per logged step too), accuracy, val AUC overall and per generator, LR
  and samples/s against steps (when runs are given);
- `report.html`: all of it with the metrics table, the most confident mistakes per generator (key,
  truth, score; thumbnails and source paths when the shard set's tars can be read), the resolved
  config and the checkpoint, when and from which commit and library versions each result was made,
  images embedded (no network access needed).

Reading the results is `ds_trainer.eval_results`, drawing the figures `ds_trainer.report_figures`;
this module writes the PNGs, the page and the TensorBoard copy. Their public names are importable
from here too.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ds_trainer.errors import ConfigError
from ds_trainer.eval_results import (
    MEAN,
    MEAN_UNSEEN,
    METRIC_LABELS,
    EvalRun,
    attach_run,
    load_eval,
    predictions_block,
    tell_apart,
)
from ds_trainer.metrics import ALL_METRICS, PROTOCOL_METRICS
from ds_trainer.published import Published
from ds_trainer.report_datasets import datasets_html, find_run_samples
from ds_trainer.report_figures import (
    accuracy_figure,
    build_figures,
    confusion_counts,
    confusion_figure,
    plain_text,
    pr_figure,
    pyplot,
    roc_figure,
    score_figure,
    training_figure,
)
from ds_trainer.report_reference import reference_figure, reference_html
from ds_trainer.report_robustness import debiased_html, robustness_html, thresholds_html
from ds_trainer.report_samples import Mistakes, Samples, confident_mistakes, mistakes_html
from ds_trainer.report_uncertainty import reliability_figure, table_rows

__all__ = [
    "MEAN",
    "METRIC_LABELS",
    "EvalRun",
    "Report",
    "accuracy_figure",
    "attach_run",
    "build_figures",
    "confident_mistakes",
    "confusion_counts",
    "confusion_figure",
    "load_eval",
    "log_to_tensorboard",
    "metrics_table_html",
    "mistakes_html",
    "plain_text",
    "pr_figure",
    "predictions_block",
    "provenance_html",
    "reliability_figure",
    "render_html",
    "roc_figure",
    "score_figure",
    "training_figure",
    "write_report",
]


@dataclass
class Report:
    out_dir: Path
    html: Path
    figures: dict[str, Path]


def write_report(
    runs: Sequence[EvalRun],
    out_dir: str | Path,
    threshold: float = 0.5,
    tensorboard: str | Path | None = None,
    reference: Published | None = None,
) -> Report:
    """Every figure as `<name>.png` in `out_dir`, and `report.html` with them embedded; with
    `tensorboard`, the same figures and the PR curves go to that log dir too."""
    if not runs:
        raise ConfigError("report: give at least one --eval RESULTS.json")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"report: --threshold {threshold} must be between 0 and 1")
    tell_apart(runs)
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"report: two runs share a name ({', '.join(names)}); name them with --name")
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    pngs: dict[str, bytes] = {}
    with plain_text():  # names are data: drawn as written, never parsed as mathtext
        figures = build_figures(runs, threshold)
        if reference is not None:
            figures["reference"] = reference_figure(runs, reference)
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
    mistakes = [confident_mistakes(run, threshold) for run in runs]
    samples = [
        find_run_samples(run, {g: {m.key for m in ms if m.key} for g, ms in found.by_generator.items()})
        for run, found in zip(runs, mistakes)
    ]
    page = out / "report.html"
    page.write_text(render_html(runs, pngs, threshold, mistakes=list(zip(mistakes, samples)), reference=reference))
    return Report(out, page, paths)


FIGURE_TITLES = {
    "roc": "ROC curves per generator",
    "pr": "Precision-recall curves per generator",
    "scores": "Scores of real and AI-generated images",
    "accuracy": "Accuracy per generator",
    "confusion": "Confusion matrix",
    "robustness": "Robustness: accuracy and AUC against the degradation level",
    "calibration": "Calibration: reliability diagram",
    "training": "Training curves",
    "reference": "Run vs the paper, per generator",
}

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.9rem}th,td{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child,th.run,td.run{text-align:left}tr.mean td{font-weight:600;border-top:2px solid #999}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:.8rem;
overflow:auto;font-size:.8rem}.muted{color:#777}table.mistakes td{vertical-align:middle}
table.mistakes td:first-child{vertical-align:top}small.ci{color:#777;white-space:nowrap}
tr.unseen td{border-top:1px solid #ccc}img.thumb{max-width:112px;max-height:112px;display:block}
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


def render_html(
    runs: Sequence[EvalRun],
    pngs: dict[str, bytes],
    threshold: float = 0.5,
    mistakes: Sequence[tuple[Mistakes, Samples]] | None = None,
    reference: Published | None = None,
) -> str:
    """The page; `mistakes` per run (with their thumbnails), else found here without thumbnails."""
    e = html.escape
    if mistakes is None:
        mistakes = [(confident_mistakes(run, threshold), Samples()) for run in runs]
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
    parts.append(provenance_html(runs))
    parts.append(
        "<h2>Metrics per generator</h2><p class='muted'>Accuracies at P(AI-generated) &ge; 0.5, as "
        "<code>ds-trainer eval</code> computed them; the mean is the unweighted mean of the generators' cells "
        "(the GenImage protocol), <code>mean_unseen</code> the same over the generators the checkpoint was not "
        "trained on. EER, ECE and NLL: lower is better. ECE over 15 equal-width bins of P(AI); NLL in nats. "
        "Under a value, its 95&nbsp;% percentile bootstrap interval (each class resampled within each "
        "generator) when the eval computed them.</p>"
    )
    parts.append(metrics_table_html(runs))
    if reference is not None:
        parts.append(reference_html(runs, reference))
    parts.append(datasets_html(runs))
    parts.append(robustness_html(runs))
    parts.append(debiased_html(runs))
    parts.append(thresholds_html(runs))
    for name, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h2>{e(FIGURE_TITLES.get(name, name))}</h2><figure><img id='fig-{e(name)}' "
            f"alt='{e(FIGURE_TITLES.get(name, name))}' src='data:image/png;base64,{data}'></figure>"
        )
    parts.append(mistakes_html(runs, mistakes, threshold))
    parts.append("<h2>Configuration</h2>")
    for run in runs:
        config = run.result.get("config")
        text = yaml.safe_dump(config, sort_keys=False) if config else "(not recorded in this eval result)"
        parts.append(
            f"<h3>{e(run.name)}</h3><p class='muted'>checkpoint {e(str(run.result.get('checkpoint', '')))}"
            f"</p><pre>{e(text)}</pre>"
        )
    parts.append("</body></html>\n")
    return "".join(parts)


def provenance_html(runs: Sequence[EvalRun]) -> str:
    """When each result was made, from which commit and with which library versions (eval JSONs
    written before `provenance` was recorded say so)."""
    from ds_trainer.provenance import VERSIONED

    e = html.escape
    libs = ("ds_trainer", *VERSIONED)
    rows = [
        "<h3>Provenance</h3><table id='provenance'><tr><th>run</th><th class='run'>evaluated (UTC)</th>"
        "<th class='run'>git commit</th>" + "".join(f"<th>{e(lib)}</th>" for lib in libs) + "</tr>"
    ]
    for run in runs:
        prov = run.result.get("provenance")
        if not isinstance(prov, dict):
            rows.append(
                f"<tr><td class='run'>{e(run.name)}</td><td class='run muted' colspan='{2 + len(libs)}'>"
                "not recorded (an eval result from before ds-trainer eval recorded it)</td></tr>"
            )
            continue
        commit = prov.get("git_commit")
        if commit:
            dirty = " <span class='muted'>+ uncommitted changes</span>" if prov.get("git_dirty") else ""
            where = f"<code title='{e(commit)}'>{e(commit[:12])}</code>{dirty}"
        else:
            where = "<span class='muted'>not run from a git checkout</span>"
        versions = prov.get("versions") or {}
        rows.append(
            f"<tr><td class='run'>{e(run.name)}</td><td class='run'>{e(str(prov.get('date') or ''))}</td>"
            f"<td class='run'>{where}</td>"
            + "".join(f"<td>{e(str(versions.get(lib) or 'n/a'))}</td>" for lib in libs)
            + "</tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def metrics_table_html(runs: Sequence[EvalRun]) -> str:
    e = html.escape
    multi = len(runs) > 1
    keys = [
        k for k in ALL_METRICS if k in PROTOCOL_METRICS or any(k in row for r in runs for row in r.table().values())
    ]
    head = "<tr><th>generator</th>" + ("<th class='run'>run</th>" if multi else "")
    head += "".join(f"<th>{e(METRIC_LABELS[k])}</th>" for k in keys) + "<th>images</th></tr>"
    rows = [f"<table id='metrics'>{head}"]
    for g in table_rows(runs):
        for run in runs:
            metrics = run.table().get(g)
            if metrics is None:
                continue
            ci = run.intervals().get(g, {})
            if g == MEAN:
                n = len(run.scores)
            elif g == MEAN_UNSEEN:
                n = int(np.isin(run.generators, (run.result.get("trained_generators") or []), invert=True).sum())
            else:
                n = int((run.generators == g).sum())
            cells = "".join(f"<td>{_value(metrics.get(k, math.nan), k)}{_interval(ci.get(k), k)}</td>" for k in keys)
            cls = {MEAN: " class='mean'", MEAN_UNSEEN: " class='mean unseen'"}.get(g, "")
            rows.append(
                f"<tr{cls}><td>{e(g)}</td>"
                + (f"<td class='run'>{e(run.name)}</td>" if multi else "")
                + f"{cells}<td>{n}</td></tr>"
            )
    rows.append("</table>")
    return "".join(rows)


def _value(v: float, key: str) -> str:
    if math.isnan(v):
        return "n/a"
    return f"{v:.3f}" if key == "nll" else f"{100 * v:.1f}"


def _interval(ci: tuple[float, float] | None, key: str) -> str:
    if ci is None or math.isnan(ci[0]):
        return ""
    return f"<br><small class='ci'>[{_value(ci[0], key)}, {_value(ci[1], key)}]</small>"


def log_to_tensorboard(
    runs: Sequence[EvalRun],
    log_dir: str | Path,
    step: int | None = None,
    threshold: float = 0.5,
    figures: dict[str, Any] | None = None,
) -> None:
    """PR curves per generator (`pr/<generator>`, `pr/<run>/<generator>` for several runs) and the
    figures as images (`report/<name>`); `figures` are drawn here unless given."""
    from torch.utils.tensorboard import SummaryWriter

    from ds_trainer.sinks import add_pr_curves

    plt = pyplot()
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for run in runs:
            at = int(step if step is not None else run.result.get("global_step") or 0)
            add_pr_curves(writer, at, run.scores, run.labels, run.generators,
                          prefix=f"pr/{run.name}" if len(runs) > 1 else "pr")  # fmt: skip
        at = int(step if step is not None else runs[0].result.get("global_step") or 0)
        with plain_text():
            for name, fig in (figures if figures is not None else build_figures(runs, threshold)).items():
                writer.add_figure(f"report/{name}", fig, global_step=at, close=figures is None)
    finally:
        writer.close()
        if figures is None:
            plt.close("all")
