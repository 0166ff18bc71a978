"""clip_preprocess and Preprocess: shapes, normalisation, mode conversion, seeded augmentation,
the bias-alignment / augmentation switches, native crops and the JPEG draft fast path."""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ds_trainer.config import DataSection
from ds_trainer.data.transforms import CLIP_MEAN, CLIP_STD, Preprocess, clip_preprocess

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


# --------------------------------------------------------------------------- Preprocess


def _coords(width: int, height: int) -> Image.Image:
    """Every pixel names its own position: R = x % 256, G = y % 256, B = x // 256 + 4 * (y // 256)."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x % 256, y % 256, x // 256 + 4 * (y // 256)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def _to_uint8(out: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: [3, S, S] -> uint8 [S, S, 3]."""
    arr = ((out * STD + MEAN) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / 255.0).permute(2, 0, 1) - MEAN) / STD


def _manual_jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like content: upsampled coarse noise plus a little fine noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return Image.fromarray(np.clip(base + rng.integers(-4, 5, base.shape), 0, 255).astype(np.uint8))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a, b))


ALL_ON = {"blur_prob": 1.0, "blur_sigma": (0.5, 2.0), "jpeg_prob": 1.0, "jpeg_quality": (40, 90)}
SETTINGS = [
    {},
    {"crop": "native"},
    {"align_jpeg_quality": 96},
    {"crop": "native", "align_jpeg_quality": 75, **ALL_ON},
    {"blur_prob": 0.5, "jpeg_prob": 0.5},
]


def test_preprocess_defaults_equal_clip_preprocess() -> None:
    img = _noise(70, 45)
    for train, seed in [(False, 0), (True, 3), (True, 4)]:
        a = Preprocess(image_size=32)(img, 1, train=train, rng=random.Random(seed))
        b = clip_preprocess(img, size=32, train=train, rng=random.Random(seed))
        assert _same(a, b)


def test_from_config_reads_the_data_section() -> None:
    data = DataSection(
        image_size=64, crop="native", align_jpeg_quality=96, blur_prob=0.5, blur_sigma=(0.1, 2.0),
        jpeg_prob=0.25, jpeg_quality=(60, 95),
    )  # fmt: skip
    pre = Preprocess.from_config(data)
    assert pre == Preprocess(64, "native", 96, 0.5, (0.1, 2.0), 0.25, (60, 95), draft=True)
    assert Preprocess.from_config(DataSection(), draft=False) == Preprocess(draft=False)


@pytest.mark.parametrize("bad", [{"crop": "squash"}, {"blur_prob": 1.5}, {"jpeg_quality": (90, 10)}, {"image_size": 0}])
def test_preprocess_rejects_bad_settings(bad: dict) -> None:
    with pytest.raises(ValueError, match="Preprocess"):
        Preprocess(**bad)


def test_preprocess_pickles() -> None:
    pre = Preprocess(image_size=32, crop="native", align_jpeg_quality=90, **ALL_ON)
    clone = pickle.loads(pickle.dumps(pre))
    assert clone == pre
    img = _noise(40, 50)
    assert _same(clone(img, 1, True, random.Random(1)), pre(img, 1, True, random.Random(1)))


def test_align_jpeg_touches_only_ai_and_equals_a_jpeg_round_trip() -> None:
    img = _noise(32, 32)  # = image_size: native crop is the identity, so the pixels can be compared exactly
    pre = Preprocess(image_size=32, crop="native", align_jpeg_quality=80)
    plain = Preprocess(image_size=32, crop="native")
    assert _same(pre(img, 0), plain(img, 0))
    ai = pre(img, 1)
    assert not _same(ai, plain(img, 1))
    assert _same(ai, _tensor(np.asarray(_manual_jpeg(img, 80))))


def test_align_jpeg_applies_to_ai_pngs_read_from_bytes() -> None:
    buf = io.BytesIO()
    _smooth(40, 40).save(buf, format="PNG")
    pre = Preprocess(image_size=40, crop="native", align_jpeg_quality=96)
    with Image.open(io.BytesIO(buf.getvalue())) as png:
        out = pre(png, 1)
    expected = _tensor(np.asarray(_manual_jpeg(_smooth(40, 40), 96)))
    assert _same(out, expected)


@pytest.mark.parametrize("settings", SETTINGS[:2] + SETTINGS[4:] + [ALL_ON])
def test_both_classes_identical_without_align(settings: dict) -> None:
    pre = Preprocess(image_size=32, **settings)
    img = _noise(50, 41)
    assert _same(pre(img, 0), pre(img, 1))
    for seed in range(3):
        assert _same(pre(img, 0, True, random.Random(seed)), pre(img, 1, True, random.Random(seed)))


@pytest.mark.parametrize("crop", ["resize", "native"])
def test_zero_probabilities_equal_the_plain_path(crop: str) -> None:
    # probability 0 must not even draw from the rng, so the crop/flip draws stay the same
    img = _noise(60, 44)
    off = Preprocess(image_size=32, crop=crop, blur_prob=0, blur_sigma=(1, 3), jpeg_prob=0, jpeg_quality=(10, 20))
    plain = Preprocess(image_size=32, crop=crop)
    for seed in range(5):
        assert _same(off(img, 0, True, random.Random(seed)), plain(img, 0, True, random.Random(seed)))


def _flip_either(out: torch.Tensor, expected: torch.Tensor) -> bool:
    return _same(out, expected) or _same(out, expected.flip(2))


def test_blur_probability_one_always_blurs() -> None:
    img = _noise(32, 32)
    pre = Preprocess(image_size=32, crop="native", blur_prob=1.0, blur_sigma=(1.5, 1.5))
    expected = _tensor(np.asarray(img.filter(ImageFilter.GaussianBlur(1.5))))
    assert all(_flip_either(pre(img, 0, True, random.Random(s)), expected) for s in range(8))


def test_jpeg_probability_one_always_reencodes() -> None:
    img = _noise(32, 32)
    pre = Preprocess(image_size=32, crop="native", jpeg_prob=1.0, jpeg_quality=(50, 50))
    expected = _tensor(np.asarray(_manual_jpeg(img, 50)))
    assert all(_flip_either(pre(img, 1, True, random.Random(s)), expected) for s in range(8))


def test_half_probabilities_mix_and_are_seeded() -> None:
    img = _noise(32, 32)
    pre = Preprocess(image_size=32, crop="native", blur_prob=0.5, blur_sigma=(1.0, 2.0), jpeg_prob=0.5)
    plain = _tensor(np.asarray(img))
    untouched = sum(_flip_either(pre(img, 0, True, random.Random(s)), plain) for s in range(40))
    assert 3 <= untouched <= 20, f"expected ~1/4 of 40 untouched, got {untouched}"
    for s in range(5):
        assert _same(pre(img, 0, True, random.Random(s)), pre(img, 0, True, random.Random(s)))


@pytest.mark.parametrize("settings", SETTINGS)
def test_eval_is_deterministic_and_ignores_the_rng(settings: dict) -> None:
    pre = Preprocess(image_size=32, **settings)
    img = _noise(70, 50)
    rng = random.Random(5)
    state = rng.getstate()
    for label in (0, 1):
        first = pre(img, label)
        assert _same(first, pre(img, label))
        assert _same(first, pre(img, label, False, rng))
    assert rng.getstate() == state


def _find_window(out: np.ndarray, src: np.ndarray) -> bool:
    """Is `out` a (possibly mirrored) window of `src` with the position its corner pixel names?"""
    size = out.shape[0]
    for cand in (out, out[:, ::-1]):
        r, g, b = (int(v) for v in cand[0, 0])
        x, y = r + 256 * (b % 4), g + 256 * (b // 4)
        if np.array_equal(cand, src[y : y + size, x : x + size]):
            return True
    return False


def test_native_crop_never_resizes() -> None:
    img = _coords(300, 400)
    src = np.asarray(img)
    pre = Preprocess(image_size=224, crop="native")
    center = pre(img, 0)
    torch.testing.assert_close(center, _tensor(src[88:312, 38:262]), atol=1e-6, rtol=0)
    for seed in range(5):
        assert _find_window(_to_uint8(pre(img, 0, True, random.Random(seed))), src)


def test_native_crop_tiles_small_images() -> None:
    img = _coords(100, 60)
    src = np.asarray(img)
    pre = Preprocess(image_size=224, crop="native")
    for out in [pre(img, 0)] + [pre(img, 0, True, random.Random(s)) for s in range(4)]:
        arr = _to_uint8(out)
        assert arr.shape == (224, 224, 3)
        np.testing.assert_array_equal(arr[60:], arr[:-60])  # vertical period = image height
        np.testing.assert_array_equal(arr[:, 100:], arr[:, :-100])  # horizontal period = width
        x, y = int(arr[0, 0, 0]), int(arr[0, 0, 1])
        assert {tuple(p) for p in arr.reshape(-1, 3)} <= {tuple(p) for p in src.reshape(-1, 3)}
        assert x < 100 and y < 60
    # eval centres the original: its (0, 0) pixel lands at ((224 - 60) / 2, (224 - 100) / 2)
    np.testing.assert_array_equal(_to_uint8(pre(img, 0))[82:142, 62:162], src)


@pytest.mark.parametrize("mode", ["1", "L", "P", "P_transparent", "RGBA", "LA", "CMYK", "I;16", "F"])
@pytest.mark.parametrize("train", [False, True])
def test_every_mode_through_full_preprocess(mode: str, train: bool) -> None:
    pre = Preprocess(image_size=16, crop="native", align_jpeg_quality=90, **ALL_ON)
    for label in (0, 1):
        out = pre(_mode_image(mode), label, train, random.Random(0))
        assert out.shape == (3, 16, 16)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["RGBA", "P_transparent"])
def test_transparency_is_handled_alike_for_both_classes(mode: str) -> None:
    # half-transparent red over white, the same rule for real and ai: no class-dependent background
    img = Image.new("RGBA", (20, 30), (255, 0, 0, 128)) if mode == "RGBA" else _mode_image(mode)
    pre = Preprocess(image_size=16)
    assert _same(pre(img, 0), pre(img, 1))
    aligned = Preprocess(image_size=16, align_jpeg_quality=95)(img, 1)
    assert (aligned - pre(img, 1)).abs().max() < 0.1  # composited first, then JPEG: same colours


def _jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(1024, 1024), (900, 449), (500, 1000)])
def test_draft_keeps_the_shortest_side(size: tuple[int, int]) -> None:
    with Image.open(io.BytesIO(_jpeg_bytes(_smooth(*size)))) as im:
        im.draft("RGB", (224, 224))
        assert min(im.size) >= 224
        assert im.size != size or min(size) < 448


def test_draft_is_close_to_the_full_decode() -> None:
    data = _jpeg_bytes(_smooth(1024, 1024))
    outs = {}
    for draft in (True, False):
        with Image.open(io.BytesIO(data)) as im:
            outs[draft] = Preprocess(draft=draft)(im, 0)
    diff = (_to_uint8(outs[True]).astype(float) - _to_uint8(outs[False])).__abs__().mean()
    assert 0 < diff < 2.0, f"mean abs difference {diff:.3f} / 255"


@pytest.mark.parametrize("settings", [{"crop": "native"}, {"draft": False}])
def test_draft_off_or_native_decodes_at_full_size(settings: dict) -> None:
    data = _jpeg_bytes(_smooth(512, 512))
    with Image.open(io.BytesIO(data)) as im:
        out = Preprocess(image_size=64, **settings)(im, 0)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # a loaded image ignores draft: this is the full-size decode
        assert _same(out, Preprocess(image_size=64, **settings)(im, 0))
