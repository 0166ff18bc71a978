"""What the loop and evaluation read from a batch, and the limit on undecodable samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ds_trainer.data.transforms import normalize
from ds_trainer.errors import DataError


def unpack(batch: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) on the device: a dict with pixel_values/labels, or an (images, labels) pair.

    uint8 pixel_values (the trainer's loaders ship the crops' 8-bit pixels) are copied as they are and
    normalised with the CLIP mean/std there, the one place training, evaluation and their dummies get it;
    float ones are taken as already normalised. A data.decode gpu batch (JPEG bytes and crops) is decoded
    here first (`device_decode.decode_batch`, which drops and counts in `bad_samples` a file that fails).
    """
    if isinstance(batch, Mapping) and "jpeg" in batch:
        from ds_trainer.data.device_decode import decode_batch

        inputs = normalize(decode_batch(batch, device))  # type: ignore[arg-type]
        return inputs.to(dtype=dtype), batch["labels"].to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        inputs, targets = batch["pixel_values"], batch["labels"]
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
    else:
        raise TypeError(
            "a batch must be a dict with 'pixel_values' and 'labels', or an (images, labels) pair; "
            f"got {type(batch).__name__}"
        )
    if inputs.dtype == torch.uint8:
        inputs = normalize(inputs.to(device, non_blocking=True))
    return inputs.to(device, dtype=dtype, non_blocking=True), targets.to(device, non_blocking=True)


def bad_samples(batch: Any) -> int:
    """Samples the streaming loader could not decode while filling this batch."""
    return int(batch.get("bad_samples", 0)) if isinstance(batch, Mapping) else 0


def size(batch: Any) -> int | None:
    """Samples in the batch (0: every file of a map-style batch was bad); None for what `unpack` refuses."""
    if isinstance(batch, Mapping):
        targets = batch.get("labels")
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        targets = batch[1]
    else:
        return None
    return int(targets.shape[0]) if hasattr(targets, "shape") else len(targets) if targets is not None else None


def keys(batch: Any) -> Sequence[Any]:
    return batch.get("key", ()) if isinstance(batch, Mapping) else ()


def sizes(batch: Any) -> Sequence[Any]:
    """(width, height) of each image file in the batch, as the streaming loader records them."""
    return batch.get("size", ()) if isinstance(batch, Mapping) else ()


def check_bad_fraction(bad: int, good: int, what: str, limit: float) -> None:
    total = bad + good
    if total and bad / total > limit:
        raise DataError(
            f"{bad} of {total} {what} samples ({bad / total:.1%}) could not be decoded, above "
            f"data.max_bad_fraction {limit:g}; the warnings above name them: replace those files or re-create "
            "the shards (ds-trainer shard verifies every image), or raise the limit"
        )
