"""Raw tar samples -> checked, decoded, preprocessed samples -> batches; bad samples are skipped and counted.

Bad is: an image that does not decode or whose size is out of bounds (image_limits: MIN_IMAGE_SIDE,
MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO); a label missing or not 0/1; and every stand-in the tar reader put in the stream.
"""

from __future__ import annotations

import functools
import io
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from ds_trainer.data.device_decode import DeviceJpeg, NotJpeg
from ds_trainer.data.fast_decode import decoded, fast_formats
from ds_trainer.data.image_limits import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, open_checked
from ds_trainer.data.raw_pixels import RAW_KEY, raw_image
from ds_trainer.data.scan import IMAGE_KEYS
from ds_trainer.data.tar_stream import UNREADABLE
from ds_trainer.data.transforms import clip_preprocess
from ds_trainer.errors import DataError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "Preprocessor",
    "clip_preprocessor",
    "collate",
    "decode_samples",
    "open_checked",
]

# the name these lines had before decoding got its own module: train.log records it
logger = logging.getLogger("ds_trainer.data.pipeline")


class _StandIn(Exception):
    """A stand-in met in decode_samples: bad, and already logged by the tar reader that made it."""


Preprocessor = Callable[..., torch.Tensor]  # (img, label, train, rng) -> [3, S, S]


def clip_preprocessor(image_size: int) -> Preprocessor:
    return functools.partial(_clip_preprocess, image_size=image_size)


def _clip_preprocess(
    img: Image.Image, label: int, train: bool, rng: random.Random | None, *, image_size: int
) -> torch.Tensor:
    return clip_preprocess(img, image_size, train=train, rng=rng)


def _label(sample: dict[str, Any]) -> int:
    if "cls" not in sample:
        raise ValueError("no .cls member (the label)")
    label = int(sample["cls"])
    if label not in (0, 1):
        raise ValueError(f"label {label} is neither 0 (nature) nor 1 (ai)")
    return label


def _open_image(sample: dict[str, Any], fast: frozenset[str] = frozenset()) -> Image.Image:
    """The sample's image, refused from its header if its size is out of bounds (open_checked): decoded by a
    faster library for the formats in `fast` where that gives Pillow's pixels (fast_decode), else with only
    its header read (Pillow decodes it when the preprocessing first reads a pixel)."""
    image_key = next((k for k in sample if k in IMAGE_KEYS or k == RAW_KEY), None)
    if image_key is None:
        raise ValueError(f"no image member (one of .{', .'.join(sorted(IMAGE_KEYS | {RAW_KEY}))})")
    if image_key == RAW_KEY:  # a prepared set's raw uint8 pixels (ds-trainer prepare --store raw)
        return raw_image(sample[image_key])
    data = sample[image_key]
    img = open_checked(io.BytesIO(data))
    return decoded(img, data, fast) if fast else img


def decode_samples(
    samples: Iterator[dict[str, Any]],
    *,
    train: bool,
    preprocess: Preprocessor,
    seed_tag: str,
    worker: int,
    skip_raw: int,
    max_failures_in_row: int,
) -> Iterator[dict[str, Any]]:
    # decode gpu (device_decode): the JPEG's bytes and its crop go to the device, no pixel is decoded here
    ship = preprocess.ship if isinstance(preprocess, DeviceJpeg) else None
    fast = fast_formats(preprocess)  # PNG / JPEG through pyspng / simplejpeg where the pixels are Pillow's
    skipped = 0
    in_row = 0
    pending_bad = 0
    position = 0
    for sample in samples:
        position += 1
        if position <= skip_raw:
            continue  # read before the interruption: fast-forward without decoding
        key = sample.get("__key__", "?")
        # Seeded per sample, not drawn from one stream: resuming mid-epoch must not shift it.
        rng = random.Random(f"{seed_tag}:{key}") if train else None
        try:
            if sample.get(UNREADABLE):
                raise _StandIn
            label = _label(sample)
            if ship is not None:
                shipped = ship(sample, rng)
            else:
                with _open_image(sample, fast) as img:
                    size = img.size  # the file's own, before any draft decode or resize
                    shipped = {"pixel_values": preprocess(img, label=label, train=train, rng=rng), "size": size}
        except NotJpeg as exc:
            # the run is refused, in the main process (ShardLoader): this item fills every batch from here on
            refusal = {"refused": str(exc), "bad": 0, "worker": worker, "position": position}
            while True:
                yield refusal
        except Exception as exc:  # broken images raise many types; one bad file must not stop training
            skipped += 1
            in_row += 1
            pending_bad += 1
            if not isinstance(exc, _StandIn):  # stand-ins were logged where they were made
                logger.warning(
                    "skipping sample %s of %s: %s: %s (%d skipped so far in this worker)",
                    key, sample.get("__url__", "?"), type(exc).__name__, exc, skipped,
                )  # fmt: skip
            if train and in_row > max_failures_in_row:
                # a repeating stream of nothing but failures would spin forever
                raise DataError(
                    f"no image in {sample.get('__url__', '?')} can be decoded; re-create the shards"
                ) from exc
            continue
        in_row = 0
        yield {
            **shipped, "label": label, "generator": sample["__generator__"], "key": key,
            "bad": pending_bad, "worker": worker, "position": position,
        }  # fmt: skip
        pending_bad = 0
    if pending_bad:
        # the stream (eval: finite) ended on bad samples; this tail carries their count
        yield {"bad": pending_bad, "worker": worker, "position": position}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch; an eval batch may end with decode_samples' tail, or be only that (no samples: see ShardLoader).

    decode gpu: "jpeg" (a list of each file's bytes) and "geometry" (long [B, 9]) instead of "pixel_values";
    a batch that met a non-JPEG sample is {"refused": why, ...} alone.
    """
    refused = next((s["refused"] for s in items if "refused" in s), None)
    if refused is not None:
        return {"refused": refused, "worker": items[-1]["worker"], "position": items[-1]["position"]}
    samples = [s for s in items if "label" in s]
    if samples and "jpeg" in samples[0]:
        pixels = {"jpeg": [s["jpeg"] for s in samples], "geometry": torch.stack([s["geometry"] for s in samples])}
    else:
        pixels = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]) if samples else torch.zeros(0)}
    return {
        **pixels,
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "generator": [s["generator"] for s in samples],
        "key": [s["key"] for s in samples],
        "size": [s["size"] for s in samples],  # (width, height) of each image file
        "bad_samples": sum(s["bad"] for s in items),
        "worker": items[-1]["worker"],
        "position": items[-1]["position"],  # raw samples this worker had read by the end of the batch
    }
