"""The report's robustness and debiased parts, from the eval JSON's `robustness` and `debiased` blocks
(`ds-trainer eval --perturb / --align-jpeg / --size-matched`, see ds_trainer/eval_tracks.py).

- `robustness.png`: a panel per kind (JPEG, blur, resize, downscale), the clean result first and the
  levels after it from mild to severe; accuracy (top row) and AUC (bottom row). One run: a line per
  generator and the mean (thick, black); several runs: the mean of each run.
- HTML: per kind, a table of accuracy per generator and level; per debiased track, its protocol
  table under the label that says what it is.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from ds_trainer.eval_results import MEAN, METRIC_LABELS, EvalRun
from ds_trainer.metrics import PROTOCOL_METRICS

KIND_TITLES = {"jpeg": "JPEG quality", "blur": "Gaussian blur sigma (px)", "resize": "shortest side (px)",
               "downscale": "downscale factor"}  # fmt: skip
CLEAN = "clean"
FIGURE_METRICS = ("acc", "auc")


def _severity(kind: str, level: float) -> float:
    """Sort key, mild to severe: lower JPEG quality, more blur, a smaller side or factor."""
    return float(level) if kind == "blur" else -float(level)


def kinds(run: EvalRun) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """kind -> [(name, block)] from mild to severe, for one run's robustness block."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, block in (run.result.get("robustness") or {}).items():
        out.setdefault(block["kind"], []).append((name, block))
    order = [k for k in KIND_TITLES if k in out] + sorted(k for k in out if k not in KIND_TITLES)
    return {k: sorted(out[k], key=lambda nb: _severity(k, nb[1]["level"])) for k in order}


def has_robustness(runs: Sequence[EvalRun]) -> bool:
    return any(run.result.get("robustness") for run in runs)


def _value(table: dict[str, Any], generator: str, metric: str) -> float:
    v = (table.get(generator) or {}).get(metric)
    return math.nan if v is None else 100 * float(v)


def robustness_figure(runs: Sequence[EvalRun]):
    """Metric vs level, a panel per kind (columns) and metric (rows); see the module docstring."""
    from ds_trainer.report_figures import pyplot

    plt = pyplot()
    all_kinds = list(dict.fromkeys(k for run in runs for k in kinds(run)))
    cols = len(all_kinds)
    fig, axes = plt.subplots(len(FIGURE_METRICS), cols, figsize=(4.4 * cols, 3.4 * len(FIGURE_METRICS)), squeeze=False)
    for c, kind in enumerate(all_kinds):
        for r, metric in enumerate(FIGURE_METRICS):
            ax = axes[r][c]
            ticks: list[str] = [CLEAN]
            for i, run in enumerate(runs):
                levels = kinds(run).get(kind, [])
                labels = [CLEAN, *(str(b["level"]) for _, b in levels)]
                if len(labels) > len(ticks):
                    ticks = labels
                tables = [run.table(), *(b.get("generators") or {} for _, b in levels)]
                gens = [MEAN] if len(runs) > 1 else [*run.generator_names, MEAN]
                for g in gens:
                    ys = [_value(t, g, metric) for t in tables]
                    if len(runs) > 1:
                        style: dict[str, Any] = {"color": f"C{i}", "lw": 2.0, "marker": "o"}
                    elif g == MEAN:
                        style = {"color": "k", "lw": 2.2, "marker": "o"}
                    else:
                        style = {"lw": 1.2, "marker": "."}
                    ax.plot(range(len(ys)), ys, label=run.name if len(runs) > 1 else g, **style)
            ax.set_xticks(range(len(ticks)))
            ax.set_xticklabels(ticks, fontsize=8)
            ax.set(xlabel=KIND_TITLES.get(kind, kind), ylabel=f"{METRIC_LABELS[metric]} (%)", ylim=(0, 102))
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(kind if len(runs) == 1 else f"{kind}: mean over generators")
            if c == cols - 1 and r == 0:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def _cell(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.1f}"


def robustness_html(runs: Sequence[EvalRun]) -> str:
    """Per run and kind: accuracy (%) per generator at each level, the clean result first."""
    if not has_robustness(runs):
        return ""
    e = html.escape
    parts = [
        "<h2>Robustness to degradations</h2><p class='muted'>Accuracy (%) at threshold 0.5 per generator, "
        "each level a full pass over the val set with real and generated images degraded alike before "
        "preprocessing; AP and AUC per level are in the eval JSON's <code>robustness</code> block.</p>"
    ]
    for i, run in enumerate(runs):
        for kind, levels in kinds(run).items():
            if not levels:
                continue
            title = f"{run.name}: {kind}" if len(runs) > 1 else kind
            head = "".join(f"<th>{e(name)}</th>" for name, _ in levels)
            parts.append(f"<h3>{e(title)}</h3><table id='robustness-{i}-{e(kind)}'><tr><th>generator</th>"
                         f"<th>{CLEAN}</th>{head}</tr>")  # fmt: skip
            tables = [run.table(), *(b.get("generators") or {} for _, b in levels)]
            for g in [*run.generator_names, MEAN]:
                cls = " class='mean'" if g == MEAN else ""
                cells = "".join(f"<td>{_cell(_value(t, g, 'acc'))}</td>" for t in tables)
                parts.append(f"<tr{cls}><td>{e(g)}</td>{cells}</tr>")
            parts.append("</table>")
    return "".join(parts)


def debiased_html(runs: Sequence[EvalRun]) -> str:
    """Each debiased track of each run as its own labelled protocol table."""
    if not any(run.result.get("debiased") for run in runs):
        return ""
    e = html.escape
    parts = [
        "<h2>Debiased track</h2><p class='muted'>The same checkpoint and val set with the format and size "
        "shortcuts removed (\u201cFake or JPEG?\u201d, Grommelt et al. 2024); each table is its own number, "
        "not comparable with the raw one above.</p>"
    ]
    for i, run in enumerate(runs):
        for name, block in (run.result.get("debiased") or {}).items():
            title = f"{run.name}: {name}" if len(runs) > 1 else name
            parts.append(f"<h3>{e(title)}</h3><p class='muted'>{e(str(block.get('label', '')))}")
            if "rule" in block:
                parts.append(f"; {e(block['rule'])}")
            parts.append(f" ({e(str(block.get('samples', '')))} images)</p>")
            kept, total = block.get("reals_kept"), block.get("reals_total")
            head = "".join(f"<th>{e(METRIC_LABELS[k])}</th>" for k in PROTOCOL_METRICS)
            head += "<th>reals kept</th>" if kept else ""
            parts.append(f"<table id='debiased-{i}-{e(name)}'><tr><th>generator</th>{head}</tr>")
            for g, row in (block.get("generators") or {}).items():
                cls = " class='mean'" if g == MEAN else ""
                cells = "".join(f"<td>{_cell(_value({g: row}, g, k))}</td>" for k in PROTOCOL_METRICS)
                if kept:
                    cells += f"<td>{kept[g]}/{total[g]}</td>" if g in kept else "<td></td>"
                parts.append(f"<tr{cls}><td>{e(g)}</td>{cells}</tr>")
            parts.append("</table>")
    return "".join(parts)


def thresholds_html(runs: Sequence[EvalRun]) -> str:
    """Each `--threshold` table of each run (eval_thresholds), the oracle labelled as an upper bound."""
    if not any(run.result.get("thresholds") for run in runs):
        return ""
    e = html.escape
    parts = [
        "<h2>Other thresholds</h2><p class='muted'>The same scores cut elsewhere than at 0.5: a fixed "
        "threshold; <b>calibrated</b>, the threshold and temperature fitted on the holdout of the training "
        "generators and stored with the checkpoint (no test label touches it); <b>oracle</b>, per generator "
        "the threshold tuned on that generator's own test labels, an upper bound that no deployed detector "
        "reaches and not comparable with the tables above. AP and AUC do not depend on the threshold.</p>"
    ]
    for i, run in enumerate(runs):
        for name, block in (run.result.get("thresholds") or {}).items():
            title = f"{run.name}: {name}" if len(runs) > 1 else name
            if block.get("oracle"):
                title += " (oracle: upper bound)"
            parts.append(f"<h3>{e(title)}</h3><p class='muted'>{e(str(block.get('label', '')))}</p>")
            cuts = block.get("thresholds") or {}
            head = "".join(f"<th>{e(METRIC_LABELS[k])}</th>" for k in PROTOCOL_METRICS)
            head += "<th>threshold</th>" if cuts else ""
            parts.append(f"<table id='threshold-{i}-{e(name)}'><tr><th>generator</th>{head}</tr>")
            for g, row in (block.get("generators") or {}).items():
                cls = " class='mean'" if g == MEAN else ""
                cells = "".join(f"<td>{_cell(_value({g: row}, g, k))}</td>" for k in PROTOCOL_METRICS)
                if cuts:
                    cells += f"<td>{cuts[g]:.4f}</td>" if g in cuts else "<td></td>"
                parts.append(f"<tr{cls}><td>{e(g)}</td>{cells}</tr>")
            parts.append("</table>")
    return "".join(parts)
