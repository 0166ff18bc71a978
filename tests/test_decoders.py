"""fast_decode: pyspng / simplejpeg give Pillow's exact pixels where they are used; everything else is Pillow's."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ds_trainer.data import decode, fast_decode
from ds_trainer.data.decode import _open_image, clip_preprocessor, decode_samples
from ds_trainer.data.fast_decode import decoded, fast_formats
from ds_trainer.data.image_limits import open_checked
from ds_trainer.data.transforms import Preprocess

SIZES = [(512, 512), (333, 251), (8, 8), (500, 375), (1024, 768)]


def _picture(w: int, h: int, mode: str, seed: int = 0) -> Image.Image:
    """Noise over a gradient (photo-like and incompressible enough that every codec path runs)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8) // 3 + np.linspace(0, 170, w, dtype=np.uint8)[None, :, None]
    return Image.fromarray(arr.astype(np.uint8), "RGBA").convert(mode)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pillow(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.copy()


def _fast(data: bytes, formats: frozenset[str] = fast_decode.ALL) -> tuple[Image.Image, bool]:
    """(the image decoded() gives, whether the fast library made it)."""
    img = open_checked(io.BytesIO(data))
    out = decoded(img, data, formats)
    return out, out is not img


def _assert_same(out: Image.Image, data: bytes) -> None:
    ref = _pillow(data)
    assert out.mode == ref.mode and out.size == ref.size
    assert np.array_equal(np.asarray(out), np.asarray(ref))


@pytest.fixture
def both_libs():
    pytest.importorskip("pyspng")
    pytest.importorskip("simplejpeg")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_is_decoded_by_pyspng_with_pillows_pixels(both_libs, size, mode):
    data = _encode(_picture(*size, mode), "PNG")
    out, fast = _fast(data)
    assert fast
    _assert_same(out, data)


def _interlaced_png(arr: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (Pillow writes none): each pass's scanlines, filter type 0."""
    h, w, _ = arr.shape
    raw = b""
    for x0, y0, dx, dy in (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ):
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_interlaced_png_is_pixel_identical(both_libs):
    arr = np.asarray(_picture(67, 41, "RGB"))
    data = _interlaced_png(arr)
    assert _pillow(data).info.get("interlace") == 1
    out, fast = _fast(data)
    assert fast
    _assert_same(out, data)
    assert np.array_equal(np.asarray(out), arr)


JPEG_SETTINGS = [
    {"quality": 96},  # GenImage's reals (ImageNet) and the alignment's default
    {"quality": 75, "subsampling": 0},  # 4:4:4
    {"quality": 50, "subsampling": 1},  # 4:2:2
    {"quality": 90, "progressive": True},
    {"quality": 96, "optimize": True},  # optimised Huffman tables
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("settings", JPEG_SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_jpeg_is_decoded_by_simplejpeg_with_pillows_pixels(both_libs, size, settings):
    data = _encode(_picture(*size, "RGB", seed=size[0]), "JPEG", **settings)
    out, fast = _fast(data)
    assert fast
    _assert_same(out, data)


@pytest.mark.parametrize("progressive", [False, True])
def test_grey_jpeg_stays_grey_and_identical(both_libs, progressive):
    data = _encode(_picture(333, 251, "L"), "JPEG", quality=90, progressive=progressive)
    out, fast = _fast(data)
    assert fast and out.mode == "L"
    _assert_same(out, data)


def _png_16bit() -> bytes:
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 13) % 65535
    return _encode(Image.fromarray(arr.astype(np.uint16)), "PNG")  # mode I;16


def _apng() -> bytes:
    frames = [_picture(32, 32, "RGB", seed=s) for s in range(2)]
    return _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


FALLBACKS = {
    "palette png": lambda: _encode(_picture(40, 30, "RGB").quantize(16), "PNG"),
    "16-bit png": _png_16bit,
    "grey+alpha png": lambda: _encode(_picture(40, 30, "LA"), "PNG"),
    "1-bit png": lambda: _encode(_picture(40, 30, "1"), "PNG"),
    "rgb png with tRNS": lambda: _encode(_picture(40, 30, "RGB"), "PNG", transparency=(0, 0, 0)),
    "animated png": _apng,
    "cmyk jpeg": lambda: _encode(_picture(40, 30, "CMYK"), "JPEG", quality=90),
    "webp": lambda: _encode(_picture(40, 30, "RGB"), "WEBP"),
    "bmp": lambda: _encode(_picture(40, 30, "RGB"), "BMP"),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_what_the_fast_path_does_not_cover_is_left_to_pillow(name):
    data = FALLBACKS[name]()
    out, fast = _fast(data)
    assert not fast, name  # Pillow's own lazy image, untouched
    _assert_same(out, data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_file_is_left_to_pillow_which_refuses_it(both_libs, fmt):
    data = _encode(_picture(128, 96, "RGB"), fmt, quality=90)
    cut = data[: len(data) * 2 // 3]
    out, fast = _fast(cut)
    assert not fast
    with pytest.raises(OSError, match="image file is truncated"):
        out.load()


def test_without_the_libraries_everything_is_pillows(monkeypatch):
    monkeypatch.setattr(fast_decode, "_module", lambda name: None)
    for data in (_encode(_picture(64, 48, "RGB"), "PNG"), _encode(_picture(64, 48, "RGB"), "JPEG")):
        out, fast = _fast(data)
        assert not fast
        _assert_same(out, data)


def test_formats_follow_the_preprocessing():
    assert fast_formats(clip_preprocessor(224)) == {"PNG", "JPEG"}
    assert fast_formats(Preprocess(draft=False)) == {"PNG", "JPEG"}
    assert fast_formats(Preprocess(crop="native")) == {"PNG", "JPEG"}  # draft acts on crop resize only
    assert fast_formats(Preprocess(draft=True)) == {"PNG"}  # the draft decode needs Pillow's lazy JPEG
    assert fast_formats(lambda img, label, train, rng: img) == frozenset()  # a user's callable: Pillow's image


def test_draft_jpeg_is_left_to_pillow(both_libs):
    data = _encode(_picture(1024, 768, "RGB"), "JPEG", quality=90)
    out, fast = _fast(data, fast_formats(Preprocess(draft=True)))
    assert not fast and out.format == "JPEG"  # still lazy: Preprocess's draft() can shrink it


def test_header_checks_come_before_any_decode(monkeypatch):
    calls = []
    monkeypatch.setattr(fast_decode, "_png", lambda img, data: calls.append(1))
    huge = _encode(Image.new("RGB", (8, 300)), "PNG")  # aspect ratio over MAX_ASPECT_RATIO
    with pytest.raises(ValueError, match="MAX_ASPECT_RATIO"):
        _open_image({"png": huge}, fast_decode.ALL)
    assert calls == []


def _samples(items: list[tuple[str, bytes, int]]):
    for key, data, label in items:
        sample = {"__key__": key, "__url__": "mem.tar", "__generator__": "g", "cls": str(label).encode()}
        sample[key.rsplit(".", 1)[1]] = data
        yield sample


@pytest.mark.parametrize("train", [False, True])
def test_loader_tensors_equal_pillows_and_bad_samples_are_counted(both_libs, monkeypatch, train):
    good = [(f"a{i}.png", _encode(_picture(300 + i, 256, "RGB", seed=i), "PNG"), 1) for i in range(3)]
    good += [(f"b{i}.jpg", _encode(_picture(500, 375, "RGB", seed=9 + i), "JPEG", quality=96), 0) for i in range(3)]
    broken = _encode(_picture(64, 64, "RGB"), "PNG")[:200]
    items = [*good[:3], ("c.png", broken, 1), *good[3:]]
    pre = Preprocess(image_size=64, draft=False, blur_prob=0.5, jpeg_prob=0.5)

    def run() -> list[dict]:
        return list(decode_samples(_samples(items), train=train, preprocess=pre, seed_tag="t", worker=0, skip_raw=0,
                                   max_failures_in_row=5))  # fmt: skip

    used = []

    def recording(img, data, formats):
        out = fast_decode.decoded(img, data, formats)
        used.append(out is not img)
        return out

    monkeypatch.setattr(decode, "decoded", recording)
    fast = run()
    assert sum(used) == len(good)  # every good file went through a fast decoder, the truncated one did not
    monkeypatch.setattr(decode, "fast_formats", lambda p: frozenset())
    plain = run()
    assert [s.get("key") for s in fast] == [s.get("key") for s in plain] == [k for k, _, _ in good]
    assert sum(s["bad"] for s in fast) == sum(s["bad"] for s in plain) == 1
    for a, b in zip(fast, plain):
        assert torch.equal(a["pixel_values"], b["pixel_values"]), a["key"]
