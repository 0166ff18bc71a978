"""Faster decoders that give Pillow's own pixels: pyspng (libspng) for 8-bit PNG, simplejpeg (libjpeg-turbo) for JPEG.

`decoded(img, data, formats)` takes an image `image_limits.open_checked` opened from `data` (its header read and
its size checked, no pixel decoded yet) and returns it decoded by the faster library where that gives exactly
the pixels Pillow would: 8-bit grey, RGB and RGBA PNGs without a `tRNS` chunk and not animated; baseline and
progressive JPEGs that Pillow reads as RGB or L (tests/test_decoders.py checks both classes against Pillow).
Everything else is left to Pillow, untouched and still lazy: palette, 1/2/4/16-bit and transparent PNGs, APNGs,
CMYK / YCCK and MPO JPEGs, any other format, and any file the fast library refuses (a truncated or corrupt one
is then decoded, or refused, by Pillow as before, so the loader counts the same bad samples). Both libraries are
optional (requirements.txt pins them); without them every image goes through Pillow.

A JPEG is only decoded here when the preprocessing will not ask Pillow for a draft decode (`data.jpeg_draft` with
`crop: resize` shrinks it inside libjpeg, on the lazy image); `fast_formats` says which formats a preprocessor
admits. A preprocessor this module does not know (a user's callable) gets Pillow's image, as it always did.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB", 6: "RGBA"}  # IHDR colour type at bit depth 8 -> the mode Pillow opens it in
# Pillow's mode -> (the decoder's output, its layout as a Pillow raw mode): RGB comes as RGBX / RGBA, the 4 bytes a
# pixel Pillow keeps RGB in, so Image.frombytes copies rows instead of unpacking 3-byte pixels (measured faster)
_PNG_OUT = {"L": ("L", "L"), "RGB": ("RGBA", "RGBX"), "RGBA": ("RGBA", "RGBA")}
_JPEG_OUT = {"L": ("GRAY", "L"), "RGB": ("RGBX", "RGBX")}
PNG, JPEG = "PNG", "JPEG"
ALL = frozenset({PNG, JPEG})


@functools.cache
def _module(name: str) -> Any:
    """The optional decoder module, imported on first use (in the loader worker), or None when not installed."""
    try:
        return __import__(name)
    except ImportError:
        return None


def fast_formats(preprocess: Any) -> frozenset[str]:
    """The formats `decoded` may decode for images that go to `preprocess` next.

    A `transforms.Preprocess` (and the default `clip_preprocessor`) only reads the pixels, except its draft
    decode of JPEGs (`draft` with crop `resize`), which needs Pillow's lazy image: then PNG only.
    """
    from ds_trainer.data.decode import _clip_preprocess
    from ds_trainer.data.transforms import Preprocess

    if isinstance(preprocess, functools.partial) and preprocess.func is _clip_preprocess:
        return ALL  # clip_preprocess decodes without draft
    if isinstance(preprocess, Preprocess):
        return frozenset({PNG}) if preprocess.draft and preprocess.crop == "resize" else ALL
    return frozenset()


Decoded = tuple[np.ndarray, str]  # the pixels, and their layout as a Pillow raw mode


def _png(img: Image.Image, data: bytes) -> Decoded | None:
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    depth, colour = data[24], data[25]
    if depth != 8 or _PNG_MODES.get(colour) != img.mode or "transparency" in img.info:
        return None
    pyspng = _module("pyspng")
    if pyspng is None or getattr(img, "is_animated", False):
        return None
    out, raw = _PNG_OUT[img.mode]
    return pyspng.load(data, format=out), raw  # RGB as RGBA: libspng fills the alpha, read as padding


def _jpeg(img: Image.Image, data: bytes) -> Decoded | None:
    simplejpeg = _module("simplejpeg")
    if img.mode not in _JPEG_OUT or simplejpeg is None:
        return None
    space, raw = _JPEG_OUT[img.mode]
    # strict: libjpeg's warnings (a truncated or corrupt stream it would pad with grey) raise, so Pillow decides
    return simplejpeg.decode_jpeg(data, colorspace=space, strict=True), raw


def decoded(img: Image.Image, data: bytes, formats: frozenset[str] = ALL) -> Image.Image:
    """`img` (opened lazily from `data`) with its pixels, from the fast decoder where identical, else `img` itself.

    The returned image is a new, loaded one (`img` is closed) or `img` untouched, for Pillow to decode as before.
    """
    fmt = img.format
    if fmt not in formats:
        return img
    try:
        got = _png(img, data) if fmt == PNG else _jpeg(img, data)
    except Exception:  # noqa: BLE001 - the fast library refused the file: Pillow decodes it, or names its fault
        return img
    if got is None:
        return img
    arr, raw = got
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if arr.dtype != np.uint8 or arr.shape[:2] != (img.height, img.width) or channels != len(raw):
        return img
    out = Image.frombytes(img.mode, img.size, np.ascontiguousarray(arr), "raw", raw)
    img.close()
    return out
