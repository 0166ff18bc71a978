"""The report's cross-dataset part, from the eval JSON's `datasets` block (`ds-trainer eval --shards ...`,
see ds_trainer/eval_datasets.py): per run, a table with a row per shard set and generator, each set's
mean, and the mean over sets; and the thumbnails of a pooled result, looked up in each set's own shards."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from ds_trainer.eval_results import MEAN, METRIC_LABELS, EvalRun
from ds_trainer.metrics import PROTOCOL_METRICS
from ds_trainer.report_samples import Samples, find_samples


def has_datasets(runs: Sequence[EvalRun]) -> bool:
    return any((run.result.get("datasets") or {}).get("sets") for run in runs)


def _cells(row: dict[str, Any]) -> str:
    def cell(k: str) -> str:
        v = row.get(k)
        return "n/a" if v is None or math.isnan(float(v)) else f"{100 * float(v):.1f}"

    return "".join(f"<td>{cell(k)}</td>" for k in PROTOCOL_METRICS)


def datasets_html(runs: Sequence[EvalRun]) -> str:
    """One table per run with a `datasets` block; empty when none has one."""
    if not has_datasets(runs):
        return ""
    e = html.escape
    parts = [
        "<h2>Cross-dataset evaluation</h2><p class='muted'>one checkpoint on several shard sets; each set's mean "
        "is the unweighted mean over its generators, the mean over sets the unweighted mean of the set means.</p>"
    ]
    head = "<tr><th class='run'>set</th><th class='run'>generator</th>" + "".join(
        f"<th>{e(METRIC_LABELS[k])}</th>" for k in PROTOCOL_METRICS
    ) + "<th>images</th></tr>"  # fmt: skip
    for i, run in enumerate(runs):
        block = run.result.get("datasets") or {}
        if not block.get("sets"):
            continue
        rows = [f"<h3>{e(run.name)}</h3><table class='cross-dataset' id='cross-dataset-{i}'>{head}"]
        for name, b in block["sets"].items():
            where = f"{b.get('shards', '')} ({b.get('split', '')})"
            for g, row in (b.get("generators") or {}).items():
                cls = " class='mean'" if g == MEAN else ""
                label = "mean" if g == MEAN else g
                n = b.get("samples", "") if g == MEAN else ""
                rows.append(f"<tr{cls}><td class='run' title='{e(where)}'>{e(name)}</td><td class='run'>{e(label)}"
                            f"</td>{_cells(row)}<td>{e(str(n))}</td></tr>")  # fmt: skip
        rows.append(
            f"<tr class='mean' id='cross-dataset-{i}-mean'><td class='run'>mean over sets</td>"
            f"<td class='run'>{len(block['sets'])} sets</td>{_cells(block.get('mean') or {})}<td></td></tr></table>"
        )
        parts.append("".join(rows))
    return "".join(parts)


def find_run_samples(run: EvalRun, wanted: dict[str, set[str]]) -> Samples:
    """Thumbnails for a run's mistakes (generator -> keys); a pooled cross-dataset result names its
    generators and keys NAME/..., and each set's are found in that set's own shards."""
    block = run.result.get("datasets") or {}
    sets = block.get("sets") or {}
    if run.result.get("shards") or len(sets) < 2:
        return find_samples(run.result.get("shards"), run.result.get("split"), wanted)
    out = Samples()
    for name, b in sets.items():
        prefix = f"{name}/"
        mine = {g[len(prefix):]: {k[len(prefix):] for k in keys if k.startswith(prefix)}
                for g, keys in wanted.items() if g.startswith(prefix)}  # fmt: skip
        found = find_samples(b.get("shards"), b.get("split"), mine)
        out.thumbs.update({prefix + k: v for k, v in found.thumbs.items()})
        out.paths.update({prefix + k: v for k, v in found.paths.items()})
        out.problem = out.problem or found.problem
    return out
