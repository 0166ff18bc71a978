"""CLIP image preprocessing in plain PIL + numpy + torch (torchvision is not a dependency).

Matches open_clip / HF CLIPImageProcessor for evaluation: shortest side to `size` (bicubic),
center crop, scale to [0, 1], normalise with the CLIP mean/std.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageCms

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255, 255)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    # PIL's own I/F -> L conversion clips at 255, which turns every 16-bit image white.
    # One fixed rule per mode (never per-image statistics) so equal files give equal
    # tensors: integer modes are 16-bit data, float mode is [0, 1] data.
    arr = np.asarray(img, dtype=np.float64)
    arr = arr * 255.0 if img.mode == "F" else arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels are composited on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        if mode == "La":
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _WHITE)
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img).convert("RGB")
    if mode == "LAB":
        # convert("RGB") would reinterpret L*a*b* bytes as RGB; a colour transform is needed.
        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(img, lab_to_srgb)
    return img.convert("RGB")


def resize_shortest(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side equals `size` (bicubic); untouched when it already does."""
    w, h = img.size
    short = min(w, h)
    if short == size:
        return img
    if w <= h:
        new = (size, max(size, round(h * size / w)))
    else:
        new = (max(size, round(w * size / h)), size)
    return img.resize(new, Image.Resampling.BICUBIC)


def _crop_box(w: int, h: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    if rng is None:
        # same rounding as torchvision's CenterCrop so eval numbers are comparable
        left = int(round((w - size) / 2.0))
        top = int(round((h - size) / 2.0))
    else:
        left = rng.randint(0, w - size)
        top = rng.randint(0, h - size)
    return left, top, left + size, top + size


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] normalised with the CLIP mean/std."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return (tensor - _MEAN) / _STD


def clip_preprocess(
    img: Image.Image,
    size: int = 224,
    train: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """PIL image -> float32 tensor [3, size, size] ready for a CLIP vision tower.

    Eval: shortest side to `size`, center crop. Train: shortest side to `size`, random crop and
    random horizontal flip drawn from `rng` (a fresh unseeded one when None), so a seeded rng
    gives a reproducible augmentation.
    """
    img = resize_shortest(to_rgb(img), size)
    if train:
        rng = rng if rng is not None else random.Random()
        box = _crop_box(*img.size, size, rng)
        img = img.crop(box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        img = img.crop(_crop_box(*img.size, size, None))
    return to_normalized_tensor(img)
