"""CLIP image preprocessing in plain PIL + numpy + torch (torchvision is not a dependency).

`clip_preprocess` matches open_clip / HF CLIPImageProcessor for evaluation: shortest side to
`size` (bicubic), center crop, scale to [0, 1], normalise with the CLIP mean/std.

`Preprocess` is the configurable version the data pipeline uses (built from the config's `data`
section). Per image, in this order:

1. `to_rgb` -- the same rule for every class: transparent pixels (RGBA, LA, PA, P/L/RGB with a
   `transparency` entry) are composited on white, 16-bit / float data is scaled (not clipped),
   CMYK / YCbCr / HSV / LAB are colour-converted.
2. `align_jpeg_quality` -- label 1 (ai) only (`align_classes="fakes"`, the default), or every
   image (`"both"`): re-encode as JPEG at that quality. GenImage's reals are JPEG (~q96) and its
   fakes lossless PNG, so a detector can score well by detecting JPEG ("Fake or JPEG?", Grommelt
   et al. 2024); aligning the formats removes that shortcut. Fakes-only is the one step that
   treats the classes differently, and it applies at eval too because it defines the data, not an
   augmentation. Then `perturb` (a `data.perturb.Perturbation`, eval's robustness sweeps), the
   same for both classes.
3. train only, both classes alike: Gaussian blur with probability `blur_prob`, then JPEG
   re-encoding with probability `jpeg_prob` (CNNSpot's Blur+JPEG(0.5), Wang et al. 2020).
4. geometry -- `crop="resize"`: shortest side to `image_size`, then a random (train) or center
   (eval) crop; `crop="native"`: no resampling at all, a random / center crop of the pixels as
   they are, small images tiled (wrapped) up to `image_size` first (`ds_trainer.data.native`). Train adds a
   random horizontal flip in both modes. Eval with `crop="native"` and `eval_crops` K > 1: the
   K windows of `native.native_crops` (FiveCrop / TenCrop placement), stacked.
5. CLIP mean/std normalisation, or with `uint8` none: the crop's 8-bit pixels, for `normalize` on the
   device (the trainer's loaders: a quarter of the bytes through the worker queue and the host copy).

Output: float32 [3, S, S] (uint8 with `uint8`), or [K, 3, S, S] for an eval image with eval_crops K > 1
(a batch of them is [B, K, 3, S, S]; `evaluation` scores each image by the mean of its crops' logits).
Eval never draws from an rng, so it is deterministic.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageCms, ImageFilter

from ds_trainer.data.native import EVAL_CROPS, native_crop, native_crops

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

if TYPE_CHECKING:
    from ds_trainer.data.perturb import Perturbation

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


def resize_shortest_size(w: int, h: int, size: int) -> tuple[int, int]:
    """The (width, height) resize_shortest makes of a w x h image: the shorter side becomes `size`."""
    if min(w, h) == size:
        return w, h
    return (size, max(size, round(h * size / w))) if w <= h else (max(size, round(w * size / h)), size)


def resize_shortest(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side equals `size` (bicubic); untouched when it already does."""
    new = resize_shortest_size(*img.size, size)
    return img if new == img.size else img.resize(new, Image.Resampling.BICUBIC)


class ResizeCrop(NamedTuple):
    """crop resize's geometry of one image: resize to (width, height), take the size x size crop at (left, top),
    then mirror it when `flip`. What `Preprocess.resize_crop` draws; `device_decode` applies it on the device."""

    width: int
    height: int
    left: int
    top: int
    flip: bool


def _crop_box(w: int, h: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    if rng is None:
        # same rounding as torchvision's CenterCrop so eval numbers are comparable
        left = round((w - size) / 2.0)
        top = round((h - size) / 2.0)
    else:
        left = rng.randint(0, w - size)
        top = rng.randint(0, h - size)
    return left, top, left + size, top + size


def to_normalized_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image (or uint8 [H, W, 3] array) -> float32 [3, H, W] normalised with the CLIP mean/std."""
    arr = np.ascontiguousarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return (tensor - _MEAN) / _STD


def to_uint8_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image (or uint8 [H, W, 3] array) -> uint8 [3, H, W]; `normalize` makes it to_normalized_tensor's."""
    # one copy, channels first: np.array copies (so the tensor owns writable memory), order="C" packs it
    return torch.from_numpy(np.array(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), order="C"))


_DEVICE_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalised with the CLIP mean/std, on the tensor's own device.

    The same float32 operations as to_normalized_tensor (x / 255, minus the mean, over the std), so on a CPU
    the result is bit-identical; a GPU may round the last bit differently.
    """
    stats = _DEVICE_STATS.get(pixels.device)
    if stats is None:
        stats = _DEVICE_STATS.setdefault(pixels.device, (_MEAN.to(pixels.device), _STD.to(pixels.device)))
    mean, std = stats
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    """`img` (RGB) encoded as JPEG at `quality`: Pillow's defaults otherwise (4:2:0 chroma subsampling,
    standard tables), which is what most JPEG photos, GenImage's ImageNet reals included, were saved with."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """Encode `img` (RGB) as JPEG at `quality` in memory (`jpeg_bytes`) and decode it again.

    `ds-trainer prepare --align-jpeg` stores those same bytes, so a prepared shard decodes to these pixels.
    """
    with Image.open(io.BytesIO(jpeg_bytes(img, quality))) as out:
        out.load()
        return out.convert("RGB")


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` px (PIL's `radius` is the sigma)."""
    if sigma <= 0:
        return img
    return img.filter(ImageFilter.GaussianBlur(radius=sigma))


Crop = Literal["resize", "native"]
CROP_MODES = ("resize", "native")
Decode = Literal["cpu", "gpu"]
DECODE_MODES = ("cpu", "gpu")
AlignClasses = Literal["fakes", "both"]
ALIGN_CLASSES = ("fakes", "both")


@dataclass(frozen=True)
class Preprocess:
    """PIL image + label -> float32 [3, S, S]; the steps are listed in the module docstring.

    The defaults reproduce `clip_preprocess` (plus the draft fast path, see `draft`). A frozen
    dataclass of plain values, so it pickles into DataLoader workers and compares by value.

    draft: for JPEG inputs with crop="resize", let libjpeg decode at 1/2, 1/4 or 1/8 scale
    (`Image.draft`) while the shortest side stays >= image_size, instead of decoding at full size
    and shrinking with the bicubic resize. Several times faster for large JPEGs, and close to,
    not identical with, the full decode. It only acts on an image that is not loaded yet, and
    only on JPEG files: in GenImage that is the real class alone, so turn it off when even a
    small class-correlated processing difference matters.

    eval_crops: with crop="native", eval returns that many crops per image, [K, 3, S, S] (1, 5 or
    10; placement in `ds_trainer.data.native`); training always takes its one random crop.

    uint8: return the crop's pixels as uint8, not normalised (the trainer's loaders: `batches.unpack`
    normalises them on the device right before the forward, `normalize`); the same model inputs.

    decode: where the trainer's loaders decode (`data.decode`): "gpu" makes `make_shard_loader` ship each
    JPEG's bytes and its `resize_crop` geometry instead of pixels (`device_decode`); calling the instance is
    always the CPU path.
    """

    image_size: int = 224
    crop: Crop = "resize"
    align_jpeg_quality: int | None = None
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (30, 100)
    draft: bool = True
    align_classes: AlignClasses = "fakes"
    perturb: Perturbation | None = None
    eval_crops: int = 1
    uint8: bool = False
    resize_shortest: int | None = None
    decode: Decode = "cpu"

    def __post_init__(self) -> None:
        # tuples (not lists from YAML) keep the instance hashable and the rng draws typed
        object.__setattr__(self, "blur_sigma", tuple(float(v) for v in self.blur_sigma))
        object.__setattr__(self, "jpeg_quality", tuple(int(v) for v in self.jpeg_quality))
        _check(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        _check(self.crop in CROP_MODES, f"crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        _check(self.decode in DECODE_MODES,
               f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")  # fmt: skip
        _check(self.eval_crops in EVAL_CROPS,
               f"eval_crops must be one of {', '.join(map(str, EVAL_CROPS))}, got {self.eval_crops!r}")  # fmt: skip
        _check(self.eval_crops == 1 or self.crop == "native",
               f"eval_crops {self.eval_crops} needs crop 'native', got {self.crop!r}")  # fmt: skip
        r = self.resize_shortest
        _check(r is None or (self.crop == "resize" and r >= self.image_size),
               f"resize_shortest {r} needs crop 'resize' and at least image_size {self.image_size}")  # fmt: skip
        q = self.align_jpeg_quality
        _check(q is None or 1 <= q <= 100, f"align_jpeg_quality must be None or in [1, 100], got {q}")
        _check(self.align_classes in ALIGN_CLASSES,
               f"align_classes must be one of {', '.join(ALIGN_CLASSES)}, got {self.align_classes!r}")  # fmt: skip
        for name in ("blur_prob", "jpeg_prob"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
        _check(len(self.blur_sigma) == 2 and 0 <= self.blur_sigma[0] <= self.blur_sigma[1],
               f"blur_sigma must be (low, high) with 0 <= low <= high, got {self.blur_sigma}")  # fmt: skip
        _check(len(self.jpeg_quality) == 2 and 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100,
               f"jpeg_quality must be (low, high) with 1 <= low <= high <= 100, got {self.jpeg_quality}")  # fmt: skip

    @classmethod
    def from_config(cls, data: Any, *, draft: bool = True, uint8: bool = False) -> Preprocess:
        """From the config's `data` section (a DataSection or anything with the same attributes)."""
        return cls(
            image_size=data.image_size,
            crop=data.crop,
            align_jpeg_quality=data.align_jpeg_quality,
            blur_prob=data.blur_prob,
            blur_sigma=tuple(data.blur_sigma),
            jpeg_prob=data.jpeg_prob,
            jpeg_quality=tuple(data.jpeg_quality),
            draft=draft,
            eval_crops=data.eval_crops,
            uint8=uint8,
            resize_shortest=getattr(data, "resize_shortest", None),
            decode=getattr(data, "decode", "cpu"),
        )

    def __call__(
        self, img: Image.Image, label: int, train: bool = False, rng: random.Random | None = None
    ) -> torch.Tensor:
        """Preprocess one image of class `label` (1 = ai, 0 = nature).

        Train draws every random choice from `rng` (a fresh unseeded one when None), so a seeded
        rng reproduces the augmentation; eval ignores `rng` and is deterministic.
        """
        self._apply_draft(img)
        img = to_rgb(img)
        if self.align_jpeg_quality is not None and (self.align_classes == "both" or int(label) == 1):
            img = jpeg_roundtrip(img, self.align_jpeg_quality)
        if self.perturb is not None:
            img = self.perturb(img)
        if not train:
            return self._geometry(img, None)
        rng = rng if rng is not None else random.Random()
        return self._geometry(self._augment(img, rng), rng)

    def _apply_draft(self, img: Image.Image) -> None:
        # a no-op for non-JPEG, for already loaded images, and when the image is < 2x the size
        if self.draft and self.crop == "resize" and img.format == "JPEG":
            side = self.resize_side
            img.draft("RGB", (side, side))

    @property
    def resize_side(self) -> int:
        """What crop resize scales the shortest side to before the image_size crop."""
        return self.resize_shortest or self.image_size

    def _augment(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """Blur, then JPEG, each with its probability; a probability of 0 draws nothing, so the
        geometry's draws (and hence the output) equal those of the plain path for the same seed."""
        if self.blur_prob > 0 and rng.random() < self.blur_prob:
            img = gaussian_blur(img, rng.uniform(*self.blur_sigma))
        if self.jpeg_prob > 0 and rng.random() < self.jpeg_prob:
            img = jpeg_roundtrip(img, rng.randint(*self.jpeg_quality))
        return img

    def _geometry(self, img: Image.Image, rng: random.Random | None) -> torch.Tensor:
        """Crop to image_size (random + flip with `rng`, center without) and normalise (or not: `uint8`)."""
        size = self.image_size
        tensor = to_uint8_tensor if self.uint8 else to_normalized_tensor
        if self.crop == "native" and rng is None and self.eval_crops > 1:
            return torch.stack([tensor(c) for c in native_crops(img, size, self.eval_crops)])
        if self.crop == "native":
            arr = native_crop(img, size, rng)
            if rng is not None and rng.random() < 0.5:
                arr = arr[:, ::-1]
            return tensor(arr)
        geo = self.resize_crop(*img.size, rng)
        if (geo.width, geo.height) != img.size:
            img = img.resize((geo.width, geo.height), Image.Resampling.BICUBIC)
        img = img.crop((geo.left, geo.top, geo.left + size, geo.top + size))
        if geo.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return tensor(img)

    def resize_crop(self, width: int, height: int, rng: random.Random | None) -> ResizeCrop:
        """crop resize's geometry for a width x height image: the draws `__call__` makes from `rng` (crop left,
        top, then the flip), in that order, so the device decoder's crops are the CPU path's for the same seed."""
        w, h = resize_shortest_size(width, height, self.resize_side)
        left, top, _, _ = _crop_box(w, h, self.image_size, rng)
        return ResizeCrop(w, h, left, top, rng is not None and rng.random() < 0.5)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"Preprocess: {message}")


def clip_preprocess(
    img: Image.Image,
    size: int = 224,
    train: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """PIL image -> float32 tensor [3, size, size] ready for a CLIP vision tower.

    Eval: shortest side to `size`, center crop. Train: shortest side to `size`, random crop and
    random horizontal flip drawn from `rng` (a fresh unseeded one when None), so a seeded rng
    gives a reproducible augmentation. The same for both classes; `Preprocess` is the
    configurable version (this is `Preprocess(size, draft=False)` with label 0, so the output is
    exactly what it always was).
    """
    return Preprocess(image_size=size, draft=False)(img, 0, train=train, rng=rng)
