"""Detector metrics, computed on predictions gathered from every rank.

Evaluating on rank 0's share alone (a common bug) reports a number from 1/world_size of the
validation set; everything here works on the gathered whole.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ds_trainer.detection_metrics import EXTRA_METRICS, extra_metrics


def ai_scores(outputs: torch.Tensor) -> torch.Tensor:
    """Probability of class 1 (ai) from logits: softmax for [B, C>=2], sigmoid for [B] or [B, 1]."""
    outputs = outputs.detach().float()
    if outputs.ndim == 2 and outputs.shape[1] >= 2:
        return outputs.softmax(dim=1)[:, 1]
    return outputs.reshape(-1).sigmoid()


def binary_metrics(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """acc, real/fake acc, ROC AUC and AP, and EXTRA_METRICS (balanced accuracy, EER, TPR at FPR
    1 % and 5 %, ECE, NLL; see detection_metrics); NaN where a class is missing (a one-class batch)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.size == 0:
        return dict.fromkeys(ALL_METRICS, math.nan)
    # Imported here, not at module level: scikit-learn costs ~1 s of every launch's time to first step.
    from sklearn.metrics import average_precision_score, roc_auc_score

    pred = (s >= threshold).astype(np.int64)
    real, fake = y == 0, y == 1
    both = real.any() and fake.any()
    return {
        "acc": float((pred == y).mean()),
        "real_acc": float((pred[real] == 0).mean()) if real.any() else math.nan,
        "fake_acc": float((pred[fake] == 1).mean()) if fake.any() else math.nan,
        "auc": float(roc_auc_score(y, s)) if both else math.nan,
        "ap": float(average_precision_score(y, s)) if both else math.nan,
        **extra_metrics(s, y, pred),
    }


def gather_1d(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any per-rank length from all ranks (same result on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat([p for p in parts if p is not None])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_int(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# The five numbers GenImage, UnivFD and NPR report per generator, in table order.
PROTOCOL_METRICS = ("acc", "real_acc", "fake_acc", "ap", "auc")
ALL_METRICS = (*PROTOCOL_METRICS, *EXTRA_METRICS)
# The table's rows besides the generators: the unweighted mean over all of them, and over those the
# model was not trained on (present only when the trained ones are known and some are not among them).
MEAN, MEAN_UNSEEN = "mean", "mean_unseen"
MEAN_ROWS = (MEAN, MEAN_UNSEEN)


def gather_objects(items: list) -> list:
    """Concatenate a per-rank list of picklable items (e.g. generator names) from all ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    parts: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for p in parts if p is not None for x in p]


def per_generator_metrics(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    generators: Sequence[str],
    trained: Collection[str] | None = None,
    threshold: float | Mapping[str, float] = 0.5,
) -> dict[str, dict[str, float]]:
    """The benchmark protocol's table: each generator's val split on its own, then the unweighted
    means over all generators and over those not in `trained` (None: not known, no unseen mean).

    Each GenImage generator folder holds its own real images, so a generator's real accuracy
    and AUC are computed against the reals that ship with it. The means are over generators, not
    samples, as the papers report them (a big generator must not dominate), and always from the
    cells (never pooled). `threshold`: one for every generator, or one per generator (the oracle's).
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    g = np.asarray(generators)
    cut = threshold.get if isinstance(threshold, Mapping) else lambda _name: threshold
    table = {name: binary_metrics(s[g == name], y[g == name], cut(name)) for name in sorted(set(g.tolist()))}
    return add_means(table, trained)


def unseen_generators(names: Collection[str], trained: Collection[str] | None) -> list[str] | None:
    """The generators of `names` not in `trained`, sorted; None when there are none or `trained` is unknown."""
    if trained is None:
        return None
    unseen = sorted(n for n in names if n not in set(trained) and n not in MEAN_ROWS)
    return unseen or None


def add_means(
    table: dict[str, dict[str, float]], trained: Collection[str] | None = None
) -> dict[str, dict[str, float]]:
    """`table` (generator -> metrics) with its MEAN (and MEAN_UNSEEN) rows, computed from its cells."""
    cells = {g: row for g, row in table.items() if g not in MEAN_ROWS}
    if not cells:
        return dict(cells)
    out = dict(cells)
    out[MEAN] = mean_of_cells(cells.values())
    unseen = unseen_generators(cells, trained)
    if unseen:
        out[MEAN_UNSEEN] = mean_of_cells([cells[g] for g in unseen])
    return out


def mean_of_cells(rows: Collection[Mapping[str, float]]) -> dict[str, float]:
    keys = [k for k in ALL_METRICS if all(k in row for row in rows)]
    return {k: _mean_ignoring_nan([row[k] for row in rows]) for k in keys}


def _mean_ignoring_nan(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


# Printed column heads of EXTRA_METRICS (the JSON keys are longer)
_HEADS = {"tpr_at_fpr_1pct": "tpr@fpr1%", "tpr_at_fpr_5pct": "tpr@fpr5%"}


def format_protocol_table(
    table: dict[str, dict[str, float]], ci: Mapping[str, Mapping[str, Sequence[float | None]]] | None = None
) -> str:
    """Fixed-width text tables, percentages with one decimal as the papers print them (NLL in
    nats): GenImage's five numbers, then the metrics beyond accuracy; with `ci` (row -> metric ->
    [low, high]), each cell is followed by its interval."""
    blocks = [_text_table(table, PROTOCOL_METRICS, ci)]
    if any(k in row for row in table.values() for k in EXTRA_METRICS):
        blocks.append(_text_table(table, EXTRA_METRICS, ci))
    return "\n\n".join(blocks)


def _text_table(table: Mapping[str, Mapping[str, float]], keys: Sequence[str], ci: Mapping | None) -> str:
    width = max([len(name) for name in table] + [9])
    cells = {name: [_cell(row.get(k, math.nan), k, ((ci or {}).get(name) or {}).get(k)) for k in keys]
             for name, row in table.items()}  # fmt: skip
    col = max([8, *(len(c) for row in cells.values() for c in row)])
    head = f"{'generator':<{width}}  " + "  ".join(f"{_HEADS.get(k, k):>{col}}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, row in cells.items():
        if name == MEAN:
            lines.append("-" * len(head))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>{col}}" for c in row))
    return "\n".join(lines)


def _cell(value: float, key: str, interval: Sequence[float | None] | None) -> str:
    def num(v: float | None) -> str:
        if v is None or math.isnan(v):
            return "n/a"
        return f"{v:.3f}" if key == "nll" else f"{100 * v:.1f}"

    if interval is None:
        return num(value)
    return f"{num(value)} [{num(interval[0])}, {num(interval[1])}]"
