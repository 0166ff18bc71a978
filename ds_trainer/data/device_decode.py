"""`data.decode: gpu`: the loader workers ship JPEG bytes and each image's crop; the batch is decoded on the device.

Decoding and resizing are most of a loader worker's time (benchmarks/decode_path.py); on a GPU machine with few
cores per GPU the workers cannot keep up. With `decode: gpu` a worker only reads each JPEG's header (Pillow's
lazy open: the size bounds of image_limits apply as before, and a file that does not open is a bad sample),
draws the crop with `Preprocess.resize_crop` -- the same rng draws in the same order as the CPU path, so crop
boxes and flips are the CPU path's for the same seed -- and ships the bytes. `decode_batch` (called by
`batches.unpack`) decodes the batch: on CUDA with torchvision's batched nvJPEG (`torchvision.io.decode_jpeg` on
a list), elsewhere with simplejpeg or Pillow (the CPU fallback, logged once; what the tests here use), then
resizes each image with `interpolate(mode="bicubic", antialias=True)` -- Pillow's bicubic filter, not its exact
integer arithmetic: a pixel differs by at most a few levels -- crops and flips it.

Only for a selection whose every sample is a JPEG (e.g. after `ds-trainer prepare --align-jpeg Q`), so both
classes go through the same decoder: the first sample that is not stops the run with one line naming it
(`refusal`). What acts on the decoded full-size image in the worker cannot be done here and is refused:
Blur/JPEG augmentation, `jpeg_draft` and crop native (config), load-time JPEG alignment, eval perturbations and
a set stored as raw pixels (`for_loader`). JPEGs in a colour space other than RGB / grey (CMYK, YCCK) are
decoded by Pillow with `to_rgb` as on the CPU path, and so is a file nvJPEG refuses; a JPEG whose stream does
not end in an EOI marker (truncated) is a bad sample in the worker, and one that the host decoder refuses too is
dropped from its batch and counted bad there.
"""

from __future__ import annotations

import functools
import io
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ds_trainer.data.image_limits import open_checked
from ds_trainer.data.raw_pixels import RAW_KEY
from ds_trainer.data.scan import IMAGE_KEYS
from ds_trainer.data.transforms import Preprocess, to_rgb
from ds_trainer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_JPEG_KEYS = ("jpg", "jpeg")
_NATIVE_MODES = ("RGB", "L")  # what nvJPEG / simplejpeg turn into RGB as Pillow's to_rgb does
_EOI_WINDOW = 4096  # the end marker may be followed by padding or an appended block; a truncated stream has none
# geometry columns: the file's width, height; the resize's width, height; the crop's left, top, side; flip; and
# whether Pillow decodes it (a colour space nvJPEG / simplejpeg do not turn into RGB as to_rgb does)
GEOMETRY_COLUMNS = ("width", "height", "resize_width", "resize_height", "left", "top", "side", "flip", "pillow")


class NotJpeg(Exception):
    """A sample of the selection is not a JPEG: decode gpu refuses the run (not a bad sample)."""


@dataclass(frozen=True)
class DeviceJpeg:
    """The worker-side preprocessing of `decode: gpu`: header, size check, crop geometry, bytes (no pixels)."""

    preprocess: Preprocess

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def ship(self, sample: dict[str, Any], rng: random.Random | None) -> dict[str, Any]:
        """{"jpeg": uint8 [N] (the file's bytes), "geometry": long [9] (GEOMETRY_COLUMNS), "size": (w, h)}."""
        key = sample.get("__key__", "?")
        image_key = next((k for k in sample if k in IMAGE_KEYS or k == RAW_KEY), None)
        if image_key is None:
            raise ValueError(f"no image member (one of .{', .'.join(sorted(IMAGE_KEYS | {RAW_KEY}))})")
        if image_key not in _JPEG_KEYS:
            raise NotJpeg(_not_jpeg(key, sample, f"a .{image_key} member"))
        data = sample[image_key]
        with open_checked(io.BytesIO(data)) as img:  # the header only; out-of-bounds sizes raise (a bad sample)
            fmt, mode, size = img.format, img.mode, img.size
        if fmt != "JPEG":
            raise NotJpeg(_not_jpeg(key, sample, f"a .{image_key} member holding {fmt}"))
        if b"\xff\xd9" not in data[-_EOI_WINDOW:]:
            raise ValueError("JPEG stream has no end marker (truncated)")
        geo = self.preprocess.resize_crop(*size, rng)
        side = self.preprocess.image_size
        row = (*size, geo.width, geo.height, geo.left, geo.top, side, int(geo.flip), int(mode not in _NATIVE_MODES))
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "geometry": torch.tensor(row),
                "size": size}  # fmt: skip


def _not_jpeg(key: str, sample: dict[str, Any], what: str) -> str:
    return (
        f"data.decode gpu needs every sample to be a JPEG; sample {key} of {sample.get('__url__', '?')} is {what}: "
        "prepare the set with ds-trainer prepare --align-jpeg Q (or --resize-shortest N), or use data.decode: cpu"
    )


def for_loader(manifest: Any, preprocess: Any) -> Any:
    """`preprocess` as the loader's workers run it: a DeviceJpeg for a Preprocess with decode "gpu" (after
    prepared.for_run took off what the set holds), ConfigError for what only the CPU path can do."""
    if not isinstance(preprocess, Preprocess) or preprocess.decode != "gpu":
        return preprocess
    block = manifest.raw.get("prepared")
    if isinstance(block, dict) and block.get("store") == "raw":
        raise ConfigError(
            f"data.decode gpu decodes JPEGs, but shard set {manifest.root} was prepared with --store raw "
            "(pixels, nothing to decode): use data.decode: cpu, or prepare with --store jpeg"
        )
    if preprocess.align_jpeg_quality is not None:
        raise ConfigError(
            f"data.align_jpeg_quality {preprocess.align_jpeg_quality} re-encodes the fakes in the loader workers, "
            f"which decode gpu does not decode in: align them once with ds-trainer prepare --align-jpeg "
            f"{preprocess.align_jpeg_quality} {manifest.root} OUT and train on OUT, or use data.decode: cpu"
        )
    if preprocess.perturb is not None:
        raise ConfigError("a perturbation (ds-trainer eval --perturb) acts on the decoded image in the loader "
                          "workers: score the robustness tracks with data.decode: cpu")  # fmt: skip
    if preprocess.crop != "resize" or preprocess.blur_prob > 0 or preprocess.jpeg_prob > 0 or preprocess.draft:
        raise ConfigError("data.decode gpu needs crop: resize, no blur_prob / jpeg_prob and jpeg_draft false")
    return DeviceJpeg(preprocess)


@functools.cache
def _torchvision_decode() -> Any:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # noqa: BLE001 - not installed, or a wheel built for another torch
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def gpu_decoder_available() -> bool:
    """Whether torchvision's decode_jpeg imports (nvJPEG on CUDA); without it decode_batch uses the CPU fallback."""
    return _torchvision_decode() is not None


@functools.cache
def _say_backend(name: str) -> None:
    logger.info("data.decode gpu: JPEGs are decoded by %s", name)


def _pillow(data: torch.Tensor) -> torch.Tensor:
    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
        img.load()
        rgb = to_rgb(img)
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _host(data: torch.Tensor) -> torch.Tensor:
    """One JPEG on the CPU: simplejpeg (libjpeg-turbo) where installed and the stream is clean, else Pillow."""
    try:
        import simplejpeg
    except ImportError:
        return _pillow(data)
    try:
        arr = simplejpeg.decode_jpeg(data.numpy().tobytes(), colorspace="RGB", strict=True)
    except Exception:  # noqa: BLE001 - refused (e.g. a warning in strict mode): Pillow decodes it or says why
        return _pillow(data)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _decode(datas: list[torch.Tensor], pillow: list[bool], device: torch.device) -> list[torch.Tensor | Exception]:
    """Each JPEG as uint8 [3, H, W] on `device`, or the exception that stopped it."""
    out: list[torch.Tensor | Exception] = [RuntimeError("not decoded")] * len(datas)
    native = [i for i, p in enumerate(pillow) if not p]
    gpu = _torchvision_decode() if device.type == "cuda" else None
    if gpu is not None and native:
        _say_backend(f"nvJPEG on {device} (torchvision.io.decode_jpeg, batched)")
        # torchvision's CUDA decoder writes on a stream of its own into blocks the caching allocator may hand it
        # while kernels queued on ours still read them (pytorch/vision PR 9606): let those finish first
        torch.cuda.current_stream(device).synchronize()
        try:
            for i, img in zip(native, gpu([datas[i] for i in native], device=device), strict=True):
                out[i] = img
            native = []
        except Exception:  # noqa: BLE001 - one bad stream fails the batch call: decode one by one below
            pass
        failed = []
        for i in native:
            try:
                out[i] = gpu(datas[i], device=device)
            except Exception:  # noqa: BLE001 - nvJPEG refused it: the host decoder decides, as on the CPU path
                failed.append(i)
        native = failed
    elif native:
        _say_backend("the CPU fallback (simplejpeg or Pillow, on the host; no CUDA torchvision here)")
    # on the host: Pillow's colour spaces, and (on CUDA) what nvJPEG refused; a file refused here is bad
    for i, p in enumerate(pillow):
        if p or i in native:
            try:
                out[i] = (_pillow(datas[i]) if p else _host(datas[i])).to(device)
            except Exception as exc:  # noqa: BLE001 - dropped and counted bad by decode_batch
                out[i] = exc
    return out


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x = F.interpolate(pixels[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def apply_geometry(pixels: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> the uint8 [3, side, side] crop `geometry` (a GEOMETRY_COLUMNS row) describes."""
    width, height, rw, rh, left, top, size, flip, _ = (int(v) for v in geometry.tolist())
    if tuple(pixels.shape) != (3, height, width):
        raise ValueError(f"decoded to {tuple(pixels.shape)}, its header says 3 x {height} x {width}")
    # Pillow's order: the horizontal pass, rounded to 8 bits, then the vertical one (in float in one call, the
    # two passes' overshoot on sharp edges would not be clipped in between: up to 18 levels off, not 4)
    if rw != width:
        pixels = _resize(pixels, height, rw)
    if rh != height:
        pixels = _resize(pixels, rh, rw)
    crop = pixels[:, top : top + size, left : left + size]
    return crop.flip(-1) if flip else crop


def decode_batch(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """A DeviceJpeg batch's uint8 [B, 3, S, S] on `device`.

    An image that fails to decode is dropped from the batch (its label, key, generator and size too) and
    counted in `bad_samples`, as a worker counts one; a batch left with none raises DataError.
    """
    datas, geometry = batch["jpeg"], batch["geometry"]
    decoded = _decode(datas, [bool(g[8]) for g in geometry.tolist()], device)
    crops, kept = [], []
    for i, img in enumerate(decoded):
        try:
            if isinstance(img, Exception):
                raise img
            crops.append(apply_geometry(img, geometry[i]))
            kept.append(i)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop training
            logger.warning("skipping sample %s: %s: %s (decode gpu)", batch["key"][i], type(exc).__name__, exc)
    if len(kept) < len(datas):
        batch["bad_samples"] = batch.get("bad_samples", 0) + len(datas) - len(kept)
        for name in ("key", "generator", "size"):
            batch[name] = [batch[name][i] for i in kept]
        batch["labels"] = batch["labels"][kept]
        batch["geometry"] = geometry[kept]
        batch["jpeg"] = [datas[i] for i in kept]
    if not crops:
        raise DataError(
            f"a batch held no JPEG that decodes ({len(datas)} bad; the warnings above name them): replace them, "
            "or re-create the shards with ds-trainer shard (it verifies every image)"
        )
    return torch.stack(crops)
