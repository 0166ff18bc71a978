"""Raw uint8 RGB samples (`ds-trainer prepare --store raw`): a `.npy` member, [H, W, 3] uint8, no decoding.

Such a sample trades disk (3 bytes per pixel) for the decoder's time. A shard is untrusted input, so the
`.npy` header is checked before any pixel is touched: the shape must be [H, W, 3] of uint8 in C order,
within the loader's bounds on one image (image_limits), and the data exactly H x W x 3 bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ds_trainer.data.image_limits import check_size

RAW_KEY = "npy"  # the tar member extension of a raw sample


def raw_bytes(img: Image.Image) -> bytes:
    """An RGB image's pixels as a `.npy` file."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(img.convert("RGB"), dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def raw_image(data: bytes) -> Image.Image:
    """The RGB image a `.npy` member holds (ValueError for anything but [H, W, 3] uint8 within the bounds)."""
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"raw sample: .npy format version {version} is not read here")
    if len(shape) != 3 or shape[2] != 3 or dtype != np.uint8 or fortran:
        raise ValueError(f"raw sample: shape {shape} of {dtype} is not [H, W, 3] uint8 in C order")
    height, width = int(shape[0]), int(shape[1])
    check_size(width, height)
    offset = fp.tell()
    if len(data) - offset != height * width * 3:
        raise ValueError(f"raw sample: {len(data) - offset} bytes of pixels for a {width}x{height} RGB image")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(height, width, 3)
    return Image.fromarray(pixels, mode="RGB")
