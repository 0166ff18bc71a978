"""`ds-trainer eval --shards NAME=PATH[:SPLIT] ...`: one checkpoint scored on several shard sets at once.

Cross-dataset evaluation (train on GenImage's SD v1.4, test on Chameleon, ForenSynths, Synthbuster,
...) is the headline table of most detector papers. Each set is one full pass over its split
(`:SPLIT`, else `data.val_split`) with all its generators (`data.eval_generators` names one set's
generators, so it does not apply here), scored as the benchmark protocol scores one set: a row per
generator and the set's unweighted mean over them. The mean over sets is the unweighted mean of the
per-set means, never of the pooled images (a big set must not dominate, as a big generator must not
dominate a set's mean). The eval JSON's `datasets` block holds it all:

    {"rule": ..., "sets": {NAME: {"shards", "split", "samples", "bad_samples", "overall", "generators"}},
     "mean": {metric: mean over the sets' means}}

With several sets, the JSON's top-level `generators` and `predictions` name each generator
`NAME/generator` (so the report's per-generator figures cover every set) and the predictions' keys
are `NAME/key`; `overall` pools every image of every set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ds_trainer.errors import ConfigError, DataError
from ds_trainer.metrics import PROTOCOL_METRICS, binary_metrics, format_protocol_table, per_generator_metrics

MEAN = "mean"
RULE = "a row per set and generator; each set's mean is over its generators, the mean over sets is over the set means"


@dataclass(frozen=True)
class DatasetSpec:
    """One shard set to score: its name in the tables, its shard directory and the split to score."""

    name: str
    path: Path
    split: str


def parse_datasets(values: Sequence[str], default_split: str | None) -> list[DatasetSpec]:
    """`--shards [NAME=]PATH[:SPLIT]` values, each checked against its manifest before anything loads.

    NAME defaults to the shard directory's name; SPLIT to `default_split` (data.val_split). A value
    that names an existing directory as a whole is a path, even with a ':' in it.
    """
    from ds_trainer.data.manifest import load_manifest

    specs: list[DatasetSpec] = []
    for value in values:
        name, eq, rest = value.partition("=")
        if not eq or "/" in name:
            name, rest = "", value
        path, split = rest, None
        if ":" in rest and not Path(rest).is_dir():
            path, _, split = rest.rpartition(":")
        if not path:
            raise ConfigError(f"--shards {value}: give a shard directory, as [NAME=]PATH[:SPLIT]")
        name = name or Path(path).resolve().name
        split = split or default_split
        if not split:
            raise ConfigError(f"--shards {value}: no split to score (data.val_split is null); add :SPLIT")
        if any(s.name == name for s in specs):
            raise ConfigError(f"--shards {value}: two shard sets are named {name}; name them as NAME=PATH")
        manifest = load_manifest(path)
        if split not in manifest.splits:
            raise DataError(
                f"--shards {value}: shard set {manifest.root} has no '{split}' split (it has: "
                f"{', '.join(manifest.splits)}); name the split as {name}=PATH:SPLIT"
            )
        specs.append(DatasetSpec(name, manifest.root, split))
    return specs


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def datasets_block(per_set: dict[str, tuple[DatasetSpec, dict[str, Any]]]) -> dict[str, Any]:
    """The `datasets` block from each set's evaluation row (Trainer.evaluate), see the module docstring."""
    sets: dict[str, Any] = {}
    for name, (spec, row) in per_set.items():
        sets[name] = {
            "shards": str(spec.path), "split": spec.split, "samples": row["val_samples"],
            "bad_samples": row["val_bad_samples"],
            "overall": {k[len("val_"):]: v for k, v in row.items() if k.startswith("val_")
                        and not k.startswith("val_mean_") and isinstance(v, float)},
            "generators": row.get("val_generators", {}),
        }  # fmt: skip
    means = [b["generators"].get(MEAN, {}) for b in sets.values()]
    metrics = [k for k in dict.fromkeys(k for m in means for k in m) if all(k in m for m in means)]
    return {"rule": RULE, "sets": sets, "mean": {k: _mean([m[k] for m in means]) for k in metrics}}


def pooled(
    per_set: dict[str, dict[str, Any]], losses: dict[str, float]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(predictions, generators table, overall) over every set's images, generators named NAME/generator."""
    score, label, gen, key = [], [], [], []
    for name, pred in per_set.items():
        score.append(np.asarray(pred["score"], dtype=np.float64))
        label.append(np.asarray(pred["label"], dtype=np.int64))
        gen += [f"{name}/{g}" for g in pred.get("generator") or ["all"] * len(pred["score"])]
        keys = pred.get("key")
        key += [f"{name}/{k}" for k in keys] if keys is not None else [None] * len(pred["score"])
    s, y = np.concatenate(score), np.concatenate(label)
    keys_out = key if all(k is not None for k in key) else None
    table = per_generator_metrics(s, y, gen)
    n = {name: len(p["score"]) for name, p in per_set.items()}
    overall = {**binary_metrics(s, y), "loss": sum(losses[k] * n[k] for k in n) / max(1, sum(n.values()))}
    return {"score": s, "label": y, "generator": gen, "key": keys_out}, table, overall


def format_datasets(block: dict[str, Any]) -> str:
    """The printed cross-dataset table: a section per set (its generators and mean), then the mean over sets."""
    rows: dict[str, dict[str, float]] = {}
    for name, b in block["sets"].items():
        for g, row in b["generators"].items():
            rows[f"{name} / {g}"] = row
    table = format_protocol_table(rows)
    width = max([len(n) for n in rows] + [9])
    mean = block["mean"]
    cells = "  ".join(
        f"{100 * mean[k]:8.1f}" if not math.isnan(mean.get(k, math.nan)) else f"{'n/a':>8}" for k in PROTOCOL_METRICS
    )
    head = f"cross-dataset: {len(block['sets'])} shard set(s); {RULE}"
    return f"{head}\n{table}\n{'=' * len(table.splitlines()[0])}\n{'mean over sets':<{width}}  {cells}"


def score_datasets(
    specs: Sequence[DatasetSpec],
    evaluate: Callable[[Any], dict[str, Any]],
    predictions: Callable[[], dict[str, Any]],
    make_loader: Callable[[DatasetSpec], Any],
) -> tuple[dict[str, tuple[DatasetSpec, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Collective (every rank): one pass per set; (name -> (spec, row), name -> that pass's predictions)."""
    rows: dict[str, tuple[DatasetSpec, dict[str, Any]]] = {}
    preds: dict[str, dict[str, Any]] = {}
    for spec in specs:
        rows[spec.name] = (spec, evaluate(make_loader(spec)))
        preds[spec.name] = predictions()
    return rows, preds
