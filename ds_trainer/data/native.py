"""Native-resolution crops: windows of an image's own pixels, never resampled.

`native_crop` is `data.crop: native`'s one crop (random in training, centre at eval).
`native_crops` is eval's multi-crop (`data.eval_crops`): K windows of the model's input size
placed on the image at its native resolution, scored as one image (evaluation averages the K
crops' logits). The placements, the ones torchvision's FiveCrop / TenCrop use:

- 1: the centre crop (the same window `native_crop` takes at eval),
- 5: the four corners, then the centre (FiveCrop's order: top-left, top-right, bottom-left,
  bottom-right, centre),
- 10: those five, then the same five windows of the image mirrored left-right (TenCrop with its
  default horizontal flip; where length - size is odd, the mirror's centre crop sits 1 px off the
  mirrored centre crop, exactly as in torchvision).

Per axis of `length` px and a crop of `size` px the starts are 0 (first), the centre
(round((length - size) / 2), torchvision's CenterCrop rounding) and length - size (last). An axis
shorter than the crop is tiled (wrapped) up to it, as in training, and every crop takes the centre
window there: the whole axis is inside each crop already, so a corner would only shift the
tiling's phase. An image smaller than the crop on both axes thus gives one crop K times (10: five
times, and five times the mirror image's), and its score is that crop's.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

EVAL_CROPS = (1, 5, 10)
CROP_PLACEMENTS = {
    1: "the centre crop",
    5: "the four corners and the centre (FiveCrop)",
    10: "the four corners and the centre, of the image and of its mirror image (TenCrop)",
}


def _native_offset(length: int, size: int, rng: random.Random | None) -> int:
    """Start of a `size` window along an axis of `length` px; a shorter axis wraps around.

    Eval uses torchvision's CenterCrop rounding; on a shorter axis that formula goes negative and,
    taken modulo `length`, puts the original image in the middle of the tiling.
    Train draws any start (a shorter axis: any phase of the tiling).
    """
    if rng is None:
        return round((length - size) / 2.0) % length
    return rng.randint(0, length - size if length >= size else length - 1)


def _wrap_take(arr: np.ndarray, start: int, size: int, axis: int) -> np.ndarray:
    """`size` entries from `start` along `axis`, wrapping (= tiling the image) when it is shorter."""
    if start + size <= arr.shape[axis]:
        return arr[start : start + size] if axis == 0 else arr[:, start : start + size]
    return np.take(arr, np.arange(start, start + size), axis=axis, mode="wrap")


def _window(arr: np.ndarray, left: int, top: int, size: int) -> np.ndarray:
    return _wrap_take(_wrap_take(arr, top, size, axis=0), left, size, axis=1)


def native_crop(img: Image.Image, size: int, rng: random.Random | None) -> np.ndarray:
    """A `size` x `size` uint8 window of `img`'s pixels, never resampled: tiled if smaller.

    Resampling smooths away exactly the pixel-level traces (upsampling grids, JPEG blocks) a
    detector may learn, and its strength depends on the source size; a crop keeps them as they
    are. Tiling repeats the image (np.take with mode="wrap") instead of padding, so no constant
    border becomes a size-dependent feature. rng draws: left, then top.
    """
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    return _window(arr, _native_offset(w, size, rng), _native_offset(h, size, rng), size)


def _axis_starts(length: int, size: int) -> tuple[int, int, int]:
    """(first, centre, last) start along one axis; all the centre on an axis shorter than the crop."""
    centre = _native_offset(length, size, None)
    if length < size:
        return centre, centre, centre
    return 0, centre, length - size


def crop_windows(width: int, height: int, size: int, k: int) -> list[tuple[int, int, bool]]:
    """(left, top, mirrored) of each of the `k` eval crops, in the module docstring's order.

    `mirrored`: the window is taken from the image mirrored left-right (its own coordinates).
    """
    if k not in EVAL_CROPS:
        raise ValueError(f"eval crops must be one of {', '.join(map(str, EVAL_CROPS))}, got {k}")
    x0, xc, x1 = _axis_starts(width, size)
    y0, yc, y1 = _axis_starts(height, size)
    if k == 1:
        return [(xc, yc, False)]
    five = [(x0, y0), (x1, y0), (x0, y1), (x1, y1), (xc, yc)]
    windows = [(x, y, False) for x, y in five]
    if k == 10:
        windows += [(x, y, True) for x, y in five]
    return windows


def native_crops(img: Image.Image, size: int, k: int) -> np.ndarray:
    """The `k` eval crops of `img` (see crop_windows) as a uint8 array [k, size, size, channels]."""
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    mirror = arr[:, ::-1]
    return np.stack([_window(mirror if m else arr, left, top, size) for left, top, m in crop_windows(w, h, size, k)])
