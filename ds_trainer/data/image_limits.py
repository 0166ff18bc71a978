"""The one bound on what a single image may cost, checked from its header before any pixel is decoded.

The streaming loader, GenImageDataset, `ds-trainer predict` and `ds-trainer shard` open images
here, so all refuse the same ones. A file's header states its size in a few bytes; what it costs
follows from that size alone:

* decoding holds width x height pixels: at most MAX_IMAGE_PIXELS (8192^2, about 67 M pixels, so
  <= 256 MiB at 4 bytes per pixel for 8-bit RGB(A); GenImage's largest images are far below);
* the resize to image_size S (shortest side to S) holds S x (S x long/short) pixels: the aspect
  ratio is bounded by MAX_ASPECT_RATIO, so at most 32 S^2 pixels (4.6 MiB of RGB at S = 224).
  Without it an 8 x 12000 PNG of a few KiB would become 224 x 336000 (215 MiB), 8 x 8388608 ~147 GiB;
* sides below MIN_IMAGE_SIDE give no detector input (a 1 x 1 file is a broken export).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import IO

from PIL import Image

from ds_trainer.data.regular_file import open_regular

# Images below this side are refused in training and evaluation alike: no detector input can be
# made from them (GenImage's smallest are BigGAN's 128 x 128), and a 1 x 1 file is a broken export.
MIN_IMAGE_SIDE = 8
# Refused from the header, before any pixel is decoded: a PNG can declare 20,000 x 20,000 in a few
# hundred bytes and take GiBs to decode. GenImage's largest images (ImageNet reals) are far below;
# this is also below PIL's own limit (Image.MAX_IMAGE_PIXELS, ~89.5 M), whose warning is refused too.
MAX_IMAGE_PIXELS = 8192 * 8192
# Long side over short side: panoramas stay far below (4:1 to 10:1), and it bounds the resize.
MAX_ASPECT_RATIO = 32


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused, or None when it is admitted."""
    if width * height > MAX_IMAGE_PIXELS:
        return f"over MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS}); not decoded"
    if min(width, height) < MIN_IMAGE_SIDE:
        return f"a side is below MIN_IMAGE_SIDE ({MIN_IMAGE_SIDE})"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return f"its long side is over MAX_ASPECT_RATIO ({MAX_ASPECT_RATIO}) times its short side; not decoded"
    return None


def check_size(width: int, height: int) -> None:
    """ValueError naming the size and the bound when an image of this size is refused."""
    problem = size_problem(width, height)
    if problem is not None:
        raise ValueError(f"image is {width}x{height} pixels, {problem}")


def open_checked(source: str | Path | IO[bytes]) -> Image.Image:
    """An image (a path or a file object) with only its header read, refused if its size is out of bounds.

    Checked before decoding, so a decompression bomb costs a header read. PIL refuses above twice
    its own limit (DecompressionBombError) and only warns above it; the warning is made an error.
    A path must be a regular file (regular_file.open_regular); the image owns the file it opened
    and closes it when closed (use it in a `with` block).
    """
    fp = open_regular(source) if isinstance(source, (str, Path)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except BaseException:
        if fp is not source:
            fp.close()
        raise
    try:
        check_size(*img.size)
    except ValueError:
        img.close()
        raise
    return img
