"""Detector metrics, computed on predictions gathered from every rank.

Evaluating on rank 0's share alone (a common bug) reports a number from 1/world_size of the
validation set; everything here works on the gathered whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def ai_scores(outputs: torch.Tensor) -> torch.Tensor:
    """Probability of class 1 (ai) from logits: softmax for [B, C>=2], sigmoid for [B] or [B, 1]."""
    outputs = outputs.detach().float()
    if outputs.ndim == 2 and outputs.shape[1] >= 2:
        return outputs.softmax(dim=1)[:, 1]
    return outputs.reshape(-1).sigmoid()


def binary_metrics(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """acc, real/fake acc, ROC AUC and AP (NaN where a class is missing, e.g. a one-class batch)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.size == 0:
        nan = math.nan
        return {"acc": nan, "real_acc": nan, "fake_acc": nan, "auc": nan, "ap": nan}
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


def gather_objects(items: list) -> list:
    """Concatenate a per-rank list of picklable items (e.g. generator names) from all ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    parts: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for p in parts if p is not None for x in p]


def per_generator_metrics(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, generators: Sequence[str]
) -> dict[str, dict[str, float]]:
    """The benchmark protocol's table: each generator's val split on its own, then the unweighted mean.

    Each GenImage generator folder holds its own real images, so a generator's real accuracy
    and AUC are computed against the reals that ship with it. The mean is over generators, not
    samples, as the papers report it (a big generator must not dominate).
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    g = np.asarray(generators)
    table = {name: binary_metrics(s[g == name], y[g == name]) for name in sorted(set(g.tolist()))}
    if table:
        table["mean"] = {k: _mean_ignoring_nan([row[k] for row in table.values()]) for k in PROTOCOL_METRICS}
    return table


def _mean_ignoring_nan(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def format_protocol_table(table: dict[str, dict[str, float]]) -> str:
    """Fixed-width text table, percentages with one decimal, as the papers print them."""
    width = max([len(name) for name in table] + [9])
    head = f"{'generator':<{width}}  " + "  ".join(f"{k:>8}" for k in PROTOCOL_METRICS)
    lines = [head, "-" * len(head)]
    for name, row in table.items():
        if name == "mean":
            lines.append("-" * len(head))
        cells = "  ".join(f"{100 * row[k]:8.1f}" if not math.isnan(row[k]) else f"{'n/a':>8}" for k in PROTOCOL_METRICS)
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines)
