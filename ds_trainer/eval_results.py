"""`ds-trainer eval` results on disk: the per-image `predictions` block it writes, and reading
one result back (with a training run's metrics.jsonl/steps.jsonl) for the report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ds_trainer import metrics
from ds_trainer.errors import ConfigError, DataError

# the table's rows that are not generators, named here for the report's modules
MEAN, MEAN_UNSEEN, MEAN_ROWS = metrics.MEAN, metrics.MEAN_UNSEEN, metrics.MEAN_ROWS

METRIC_LABELS = {"acc": "accuracy", "real_acc": "real accuracy", "fake_acc": "fake accuracy", "ap": "AP", "auc": "AUC",
                 "bal_acc": "balanced accuracy", "eer": "EER", "tpr_at_fpr_1pct": "TPR at FPR 1%",
                 "tpr_at_fpr_5pct": "TPR at FPR 5%", "ece": "ECE", "nll": "NLL"}  # fmt: skip


@dataclass
class EvalRun:
    """One `ds-trainer eval` result with its per-image predictions."""

    name: str
    path: Path
    result: dict[str, Any]
    scores: np.ndarray  # P(AI-generated) per image
    labels: np.ndarray  # 1 = AI-generated, 0 = real
    generators: np.ndarray  # generator name per image
    keys: np.ndarray | None = None  # each image's sample key in the shard set; None in eval JSONs from before keys
    named: bool = False  # named by the user (--name), not after its run
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

    def intervals(self) -> dict[str, dict[str, tuple[float, float]]]:
        """row -> metric -> (low, high) of `ds-trainer eval --bootstrap`; empty without them."""
        ci = self.result.get("ci") or {}
        return {g: {k: (_num(v[0]), _num(v[1])) for k, v in row.items()} for g, row in ci.items()}


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def predictions_block(
    scores: np.ndarray, labels: np.ndarray, generators: Sequence[str] | None, keys: Sequence[str] | None = None
) -> dict[str, Any]:
    """The compact `predictions` entry of an eval JSON: generator names once, an index per image,
    and each image's sample key (`key`, only when the loader named them) to find it in the shards."""
    names = sorted(set(generators)) if generators else []
    index = {g: i for i, g in enumerate(names)}
    block: dict[str, Any] = {
        "generators": names,
        "generator": [index[g] for g in generators] if generators else [],
        "label": [int(v) for v in labels],
        "score": [round(float(v), 6) for v in scores],
    }
    if keys is not None and len(keys):
        block["key"] = [str(k) for k in keys]
    return block


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
        raise DataError(
            f"--eval {path}: predictions have {len(scores)} scores, {len(labels)} labels, "
            f"{len(gen_index)} generators; they must be equal and non-zero"
        )
    if names and (gen_index.min() < 0 or gen_index.max() >= len(names)):
        raise DataError(f"--eval {path}: a generator index is outside its {len(names)} names")
    generators = np.asarray(names, dtype=object)[gen_index] if names else np.full(len(scores), "all", dtype=object)
    keys = pred.get("key")  # absent in results written before keys were recorded
    if keys is not None and len(keys) != len(scores):
        raise DataError(f"--eval {path}: predictions have {len(keys)} keys for {len(scores)} scores")
    keys = np.asarray(keys, dtype=object) if keys else None
    return EvalRun(
        name or _default_name(path, result), path, result, scores, labels, generators, keys, named=bool(name)
    )


# Config.name's default: says nothing about the run
_UNNAMED = "run"


def _default_name(path: Path, result: dict[str, Any]) -> str:
    """The run the checkpoint came from (its config's name, else its run_dir's), so legends say
    `demo`, not `demo/epoch_6`; the checkpoint itself is in the runs table."""
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    name = config.get("name")
    if isinstance(name, str) and name and name != _UNNAMED:
        return name
    run_dir = (config.get("logging") or {}).get("run_dir") if isinstance(config.get("logging"), dict) else None
    if isinstance(run_dir, str) and Path(run_dir).name:
        return Path(run_dir).name
    ckpt = result.get("checkpoint")
    if ckpt:
        ckpt = Path(ckpt)
        return f"{ckpt.parent.parent.name or ckpt.parent.name}/{ckpt.name}"
    return path.stem


def checkpoint_tag(run: EvalRun) -> str | None:
    ckpt = run.result.get("checkpoint")
    return Path(ckpt).name if ckpt else None


def tell_apart(runs: Sequence[EvalRun]) -> None:
    """Runs named after the same training run (two checkpoints of it) get their checkpoint's tag
    appended (`demo@epoch_3`, `demo@epoch_6`); names the user gave are kept as they are."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    for run in runs:
        tag = checkpoint_tag(run)
        if not run.named and counts[run.name] > 1 and tag:
            run.name = f"{run.name}@{tag}"


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


def union_generators(runs: Sequence[EvalRun]) -> list[str]:
    """Every generator any of `runs` has, sorted: one panel or table row each when runs are overlaid."""
    return sorted({g for run in runs for g in run.generator_names})
