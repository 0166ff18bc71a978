"""clip_preprocess: shapes, normalisation, mode conversion, seeded augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from ds_trainer.data.transforms import CLIP_MEAN, CLIP_STD, clip_preprocess

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("train", [False, True])
def test_shape_and_dtype(size: int, train: bool) -> None:
    out = clip_preprocess(_noise(300, 200), size=size, train=train, rng=random.Random(0))
    assert out.shape == (3, size, size)
    assert out.dtype == torch.float32


def test_constant_image_normalisation() -> None:
    out = clip_preprocess(Image.new("RGB", (50, 60), (10, 128, 250)), size=32)
    expected = (torch.tensor([10, 128, 250]).view(3, 1, 1) / 255.0 - MEAN) / STD
    torch.testing.assert_close(out, expected.expand(3, 32, 32), atol=1e-5, rtol=0)


def test_no_resize_when_short_side_matches() -> None:
    # pixel-level artifacts are the signal; an unneeded resample would blur them
    img = _noise(48, 32)
    out = clip_preprocess(img, size=32)
    arr = np.asarray(img, dtype=np.float32)[:, 8:40] / 255.0
    expected = (torch.from_numpy(arr).permute(2, 0, 1) - MEAN) / STD
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def _mode_image(mode: str) -> Image.Image:
    if mode == "P_transparent":
        img = Image.new("P", (20, 30), 0)
        img.putpalette([255, 0, 0] + [0, 0, 0] * 255)
        img.info["transparency"] = 0
        return img
    if mode == "I;16":
        return Image.fromarray(np.full((30, 20), 65535, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(np.full((30, 20), 65535, dtype=np.int32))
    if mode == "F":
        return Image.fromarray(np.full((30, 20), 1.0, dtype=np.float32))
    return Image.new(mode, (20, 30))


@pytest.mark.parametrize(
    "mode",
    ["1", "L", "P", "P_transparent", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB", "I", "I;16", "F"],
)
def test_every_mode_converts(mode: str) -> None:
    out = clip_preprocess(_mode_image(mode), size=16)
    assert out.shape == (3, 16, 16)
    assert torch.isfinite(out).all()


WHITE = ((1.0 - MEAN) / STD).expand(3, 16, 16)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P_transparent", "I;16", "I", "F"])
def test_transparent_and_high_depth_are_white(mode: str) -> None:
    # transparent pixels composite on white; full-scale 16-bit / float pixels are white,
    # not clipped garbage
    img = _mode_image(mode)
    if mode in ("RGBA", "LA"):
        img = Image.new(mode, (20, 30))  # all zero = fully transparent black
    torch.testing.assert_close(clip_preprocess(img, size=16), WHITE, atol=1e-5, rtol=0)


def test_sixteen_bit_midgray_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.full((30, 20), 32896, dtype=np.uint16))  # 128 * 257
    out = clip_preprocess(img, size=16)
    expected = ((torch.full((3, 1, 1), 128 / 255.0) - MEAN) / STD).expand(3, 16, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_train_augmentation_is_seeded() -> None:
    img = _noise(64, 40)
    a = clip_preprocess(img, size=32, train=True, rng=random.Random(7))
    b = clip_preprocess(img, size=32, train=True, rng=random.Random(7))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    outs = {clip_preprocess(img, size=32, train=True, rng=random.Random(s)).sum().item() for s in range(10)}
    assert len(outs) > 1, "different seeds should give different crops/flips"


def test_eval_is_deterministic_center_crop() -> None:
    img = _noise(64, 40)
    torch.testing.assert_close(clip_preprocess(img, size=32), clip_preprocess(img, size=32), atol=0, rtol=0)
