"""One evaluation pass over every rank's share of a loader: loss, the protocol metrics, every image's score."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ds_trainer import batches, loaders
from ds_trainer.metrics import (
    MEAN_ROWS,
    ai_scores,
    all_reduce_max_int,
    all_reduce_sum,
    binary_metrics,
    gather_1d,
    gather_objects,
    per_generator_metrics,
)


@dataclass
class EvalResult:
    row: dict[str, Any]  # val_loss, val_acc, ..., val_generators and val_mean_* with generator names
    # every image's score, label, generator, key and (width, height) (None where the loader does not name
    # them), all ranks
    predictions: dict[str, Any]


def _steps(
    it: Iterator[Any], n_local: int, n_steps: int, drain: bool, zero3: bool, device: torch.device
) -> Iterator[Any]:
    """Each evaluation step's batch, None where this rank steps with a dummy (ZeRO-3 keeps ranks in step).

    With `drain` (a finite loader that may yield more than its len: the streaming loader, when a
    shard's tar holds more samples than its manifest counts) the batches after the announced ones
    come too, so every real sample is scored once. Under ZeRO-3 each such step is agreed on by all
    ranks (one small all-reduce; the usual case pays it once, to learn that none are left).
    """
    for i in range(n_steps):
        yield next(it, None) if i < n_local else None
    while drain:
        batch = next(it, None)
        more = all_reduce_max_int(int(batch is not None), device) if zero3 else int(batch is not None)
        if not more:
            return
        yield batch


def forward_crops(engine: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The model's outputs per image; [B, K, 3, S, S] (data.eval_crops K) gives each image its K crops' mean logits.

    The K crops of every image go through the model as one batch of B x K, so the forward pass sees
    K times the eval batch. Logits, not probabilities, are averaged: the mean is again a logit vector,
    so the loss, the score (softmax / sigmoid) and a temperature fitted on it apply unchanged, and
    it is the mean torchvision's TenCrop recipe takes (`.view(bs, ncrops, -1).mean(1)`); one crop's
    confident logit weighs more than in a mean of probabilities, which saturate at 0 and 1.
    """
    if inputs.ndim != 5:
        return engine(inputs)
    b, k = inputs.shape[:2]
    outputs = engine(inputs.flatten(0, 1))
    return outputs.float().view(b, k, *outputs.shape[1:]).mean(dim=1)


@torch.no_grad()
def evaluate(
    engine: Any,
    loader: Iterable,
    *,
    epoch: int,
    zero_stage: int,
    dtype: torch.dtype,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image_size: int,
    max_bad_fraction: float,
    trained: Collection[str] | None = None,
) -> EvalResult:
    """Collective: every rank calls it with its own loader share. `trained`: the generators the
    model learnt from, for the unseen-generators mean (None: not known, no such mean)."""
    device = engine.device
    engine.eval()
    loaders.set_epoch(loader, epoch)
    n_local = len(loader)  # type: ignore[arg-type]
    # Ranks can hold different numbers of batches. Under ZeRO-3 every forward gathers
    # parameters collectively, so short ranks must keep stepping with a dummy batch.
    n_steps = all_reduce_max_int(n_local, device) if zero_stage == 3 else n_local
    scores, labels, generators, keys, sizes = [], [], [], [], []
    loss_sum = torch.zeros((), device=device)
    bad = 0
    dummy: torch.Tensor | None = None
    drain = bool(getattr(loader, "may_exceed_len", False))
    for batch in _steps(iter(loader), n_local, n_steps, drain, zero_stage == 3, device):
        if batch is not None and batches.size(batch) == 0:  # every file of a map-style batch was bad
            bad += batches.bad_samples(batch)
            batch = None
        if batch is None:
            if dummy is None:
                dummy = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
            engine(dummy)
            continue
        inputs, targets = batches.unpack(batch, device, dtype)
        dummy = inputs.flatten(0, 1)[:1] if inputs.ndim == 5 else inputs[:1]
        outputs = forward_crops(engine, inputs)
        loss_sum += loss_fn(outputs, targets).detach().float() * targets.shape[0]
        scores.append(ai_scores(outputs))
        labels.append(targets)
        bad += batches.bad_samples(batch)
        if isinstance(batch, Mapping) and "generator" in batch:
            generators.extend(batch["generator"])
        keys.extend(batches.keys(batch))
        sizes.extend(tuple(wh) for wh in batches.sizes(batch))
    engine.train()
    all_scores = gather_1d(torch.cat(scores) if scores else torch.zeros(0))
    all_labels = gather_1d(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    total_loss = float(all_reduce_sum(loss_sum).item())
    n = all_labels.numel()
    row: dict[str, Any] = {"val_loss": total_loss / n if n else math.nan}
    row.update(overall_metrics(all_scores.cpu().numpy(), all_labels.cpu().numpy()))
    row["val_samples"] = n
    row["val_bad_samples"] = int(all_reduce_sum(torch.tensor([bad], device=device)).item())
    batches.check_bad_fraction(row["val_bad_samples"], n, "validation", max_bad_fraction)
    # Same decision on every rank (a collective follows): the streaming loader names generators.
    all_generators = gather_objects(generators) if hasattr(loader, "generators") else []
    # Gathered in rank order like the scores, so the i-th key is the i-th score's image.
    all_keys = gather_objects(keys) if hasattr(loader, "generators") else []
    all_sizes = gather_objects(sizes) if hasattr(loader, "generators") else []
    named = bool(all_generators) and len(all_generators) == n
    predictions = {
        "score": all_scores.float().cpu().numpy(),
        "label": all_labels.cpu().numpy(),
        "generator": all_generators if len(all_generators) == n else None,
        "key": all_keys if n and len(all_keys) == n else None,
        "size": all_sizes if n and len(all_sizes) == n else None,  # for eval's size-matched table
    }
    if named:
        row.update(generator_metrics(predictions["score"], predictions["label"], all_generators, trained))
    return EvalResult(row, predictions)


def overall_metrics(scores: Any, labels: Any, threshold: float = 0.5) -> dict[str, float]:
    """The row's val_acc, val_auc, val_ap, val_real_acc and val_fake_acc over every image pooled."""
    m = binary_metrics(scores, labels, threshold)
    return {f"val_{k}": m[k] for k in ("acc", "auc", "ap", "real_acc", "fake_acc")}


def generator_metrics(
    scores: Any, labels: Any, generators: Any, trained: Collection[str] | None, threshold: float = 0.5
) -> dict[str, Any]:
    """The benchmark protocol: every generator on its own, then their unweighted means (row keys)."""
    table = per_generator_metrics(scores, labels, generators, trained, threshold)
    row: dict[str, Any] = {"val_generators": table}
    for mean in MEAN_ROWS:  # val_mean_auc, ..., val_mean_unseen_auc, ...: no intervals here (cheap)
        row.update({f"val_{mean}_{k}": v for k, v in table.get(mean, {}).items()})
    return row


def trained_generators(mode: str, train_generators: Collection[str] | None, train_loader: Any) -> list[str] | None:
    """The generators a model learnt from: none for zero-shot, else `data.train_generators`, else
    every generator its training loader read; None when that is not known (a loader that names none)."""
    if mode == "zero-shot":
        return []
    if train_generators is not None:
        return sorted(train_generators)
    names = getattr(train_loader, "generators", None)
    return sorted(names) if names else None
