"""The run beside a paper (`ds-trainer report --reference NAME`): accuracy per generator, the
paper's, and the difference, as a table and side-by-side bars.

The paper's numbers come from `ds_trainer.published` (published.json). A run's generators are
matched to the paper's columns through `published.generator_key` (a GenImage shard set's folder
names; a set with other generators, like the demo, gets its own rows with no paper cell). Both
means are computed from cells: the run's is `ds-trainer eval`'s unweighted mean, the paper's the
mean of its printed cells, with its printed mean shown beside it where they differ.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ds_trainer.eval_results import MEAN, EvalRun
from ds_trainer.published import GENIMAGE_GENERATORS, Published, generator_key


@dataclass(frozen=True)
class Row:
    generator: str  # the run's generator name, or the GenImage key the paper has and the run lacks
    run: float | None  # accuracy, %
    paper: float | None

    @property
    def diff(self) -> float | None:
        return None if self.run is None or self.paper is None else self.run - self.paper


def compare(run: EvalRun, ref: Published) -> list[Row]:
    """One row per GenImage generator (paper order) and per other run generator, then the mean."""
    table = run.table()
    by_key: dict[str, str] = {}
    for name in table:
        if name != MEAN and not name.startswith("mean") and (key := generator_key(name)):
            by_key[key] = name
    rows = []
    for key in GENIMAGE_GENERATORS:
        name = by_key.get(key, key)
        acc = table.get(name, {}).get("acc")
        rows.append(Row(name, _pct(acc), ref.accuracy.get(key)))
    rows += [
        Row(name, _pct(table[name].get("acc")), None)
        for name in table
        if not name.startswith("mean") and generator_key(name) is None
    ]
    paper_mean = ref.mean_computed if ref.mean_computed is not None else ref.mean_printed
    rows.append(Row(MEAN, _pct(table.get(MEAN, {}).get("acc")), paper_mean))
    return rows


def _pct(value: Any) -> float | None:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return 100.0 * float(value)


def _fmt(v: float | None, signed: bool = False) -> str:
    return "—" if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}")


def reference_html(runs: Sequence[EvalRun], ref: Published) -> str:
    """The comparison table per run, then the paper's own table (cells, printed and computed means)."""
    e = html.escape
    parts = [
        f"<h2>Run vs {e(ref.method)}</h2><p class='muted'>Reference <code>{e(ref.name)}</code>: {e(ref.paper)}; "
        f"source {e(ref.source)}; numbers by the {e(ref.numbers_by)}. Accuracy in % at P(AI) &ge; 0.5; "
        "difference = run &minus; paper; means computed from the cells.</p>"
    ]
    for run in runs:
        parts.append(
            f"<h3>{e(run.name)}</h3><table class='reference' id='reference-{e(run.name)}'><tr><th>generator</th>"
            "<th>run acc</th><th>paper acc</th><th>difference</th></tr>"
        )
        for row in compare(run, ref):
            cls = " class='mean'" if row.generator == MEAN else ""
            parts.append(
                f"<tr{cls}><td>{e(row.generator)}</td><td>{_fmt(row.run)}</td><td>{_fmt(row.paper)}</td>"
                f"<td>{_fmt(row.diff, signed=True)}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h3>Published table</h3><table class='published'><tr><th>generator</th><th>acc</th><th>AP</th></tr>")
    for key in GENIMAGE_GENERATORS:
        parts.append(
            f"<tr><td>{e(key)}</td><td>{_fmt(ref.accuracy.get(key))}</td><td>{_fmt(ref.ap.get(key))}</td></tr>"
        )
    parts.append(
        f"<tr class='mean'><td>mean (computed)</td><td>{_fmt(ref.mean_computed)}</td><td>—</td></tr>"
        f"<tr><td>mean (printed)</td><td>{_fmt(ref.mean_printed)}</td><td>{_fmt(ref.mean_ap_printed)}</td></tr></table>"
    )
    if ref.note:
        parts.append(f"<p class='muted'>{e(ref.note)}</p>")
    return "".join(parts)


def reference_figure(runs: Sequence[EvalRun], ref: Published) -> Any:
    """Grouped bars: per generator, each run's accuracy and the paper's, side by side."""
    from ds_trainer.report_figures import pyplot

    plt = pyplot()
    tables = [compare(run, ref) for run in runs]
    labels = [row.generator for row in tables[0]]
    series = [(run.name, [row.run for row in rows]) for run, rows in zip(runs, tables)]
    series.append((f"paper: {ref.name}", [row.paper for row in tables[0]]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4))
    for i, (name, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [math.nan if v is None else v for v in values], width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Run vs {ref.name} per generator")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
