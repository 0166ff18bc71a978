"""A small GenImage-like data set made offline from scikit-learn's two bundled photos.

`nature`: random crops of the photos saved as JPEG (quality 90-95), like GenImage's ImageNet
reals. `ai`: other random crops "regenerated" with the traces generator upsamplers leave:
downscaled, upscaled back with NEAREST (blocky, `demo_nearest`) or BICUBIC (over-smooth,
`demo_bicubic`), modulated by a transposed-convolution checkerboard, and saved as PNG, like
GenImage's fakes. Both classes come from the same two photos, so content cannot give the label
away; only the artifacts can.

Why the checkerboard and the fixed 224 px crop height: measured with a randomly initialised
tiny CLIP (patch 32, hidden 64, 4 layers), the up/downsampling traces alone stay at chance after
10 epochs. They only change the *energy* of fine detail, which a linear patch embedding cannot
see without a lot of training. A checkerboard on a fixed pixel grid is seen linearly (pixels are
positive, so the alternation has a consistent sign) and gets to val AUC >= 0.96 after 2 epochs
(lr 1e-4 to 1e-3). It only survives clip_preprocess if nothing is resized, hence crops whose
short side is exactly 224; their width varies, and a horizontal shift or flip keeps the row
alternation intact.
"""

from __future__ import annotations

import inspect
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ds_trainer.data.manifest import rewrite_manifest
from ds_trainer.data.shards import shard_genimage

logger = logging.getLogger(__name__)

DEMO_GENERATORS = ("demo_nearest", "demo_bicubic")
# which upsampler each demo generator "uses"; names outside this map fall back to bicubic
UPSAMPLERS = {
    "demo_nearest": Image.Resampling.NEAREST,
    "demo_bicubic": Image.Resampling.BICUBIC,
    "demo_bilinear": Image.Resampling.BILINEAR,
}


def _load_photos() -> list[np.ndarray]:
    # imported here: scikit-learn is only needed for the demo, not for training
    from sklearn.datasets import load_sample_images

    return [np.asarray(img, dtype=np.uint8) for img in load_sample_images().images]


def _random_crop(
    photos: list[np.ndarray],
    rng: random.Random,
    crop_height: int,
    crop_width: tuple[int, int],
    brightness: float,
) -> Image.Image:
    photo = photos[rng.randrange(len(photos))]
    height, width = photo.shape[:2]
    crop_h = min(crop_height, height)
    crop_w = rng.randint(crop_width[0], min(crop_width[1], width))
    top = rng.randint(0, height - crop_h)
    left = rng.randint(0, width - crop_w)
    arr = photo[top : top + crop_h, left : left + crop_w].astype(np.float32)
    arr *= 1.0 + rng.uniform(-brightness, brightness)
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def _checkerboard(img: Image.Image, amplitude: float) -> Image.Image:
    # A stride-2 transposed convolution covers even and odd output pixels with different
    # numbers of kernel taps (Odena et al. 2016), so intensity alternates on a fixed grid.
    height, width = img.size[1], img.size[0]
    rows = 1.0 + amplitude * np.where(np.arange(height) % 2 == 0, 1.0, -1.0)
    cols = 1.0 + amplitude * np.where(np.arange(width) % 2 == 0, 1.0, -1.0)
    arr = np.asarray(img, dtype=np.float32) * (rows[:, None] * cols[None, :])[..., None]
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")


def _regenerate(
    img: Image.Image, rng: random.Random, downscale: tuple[float, float], upsampler: int, checkerboard: float
) -> Image.Image:
    factor = rng.uniform(*downscale)
    width, height = img.size
    small = (max(1, round(width / factor)), max(1, round(height / factor)))
    # BOX is an area average: the low-resolution "latent" image a generator would upsample
    out = img.resize(small, Image.Resampling.BOX).resize((width, height), upsampler)
    return _checkerboard(out, checkerboard) if checkerboard > 0 else out


def build_demo_tree(
    out: str | Path,
    *,
    train_per_class: int = 400,
    val_per_class: int = 100,
    generators: tuple[str, ...] = DEMO_GENERATORS,
    seed: int = 0,
    crop_height: int = 224,
    crop_width: tuple[int, int] = (224, 256),
    ai_downscale: tuple[float, float] = (2.0, 2.0),
    jpeg_quality: tuple[int, int] = (90, 95),
    brightness: float = 0.1,
    checkerboard: float = 0.02,
    png_compress_level: int = 1,
) -> Path:
    """Write <out>/<generator>/{train,val}/{ai,nature}/ images; returns `out`.

    Strength knobs: `checkerboard` (relative amplitude of the alternation; 0.01 learns slowly,
    0.03 is solved in one epoch, 0 leaves only the hard upsampling traces), `ai_downscale`
    (upsampling factor range), `jpeg_quality` of the reals, `crop_height` (not 224 means
    clip_preprocess resizes, which scrambles the pixel-grid traces), `crop_width` range and
    `brightness` jitter. Deterministic for a given seed and arguments.
    """
    root = Path(out)
    photos = _load_photos()
    for gen in generators:
        upsampler = UPSAMPLERS.get(gen, Image.Resampling.BICUBIC)
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            for cls in ("nature", "ai"):
                class_dir = root / gen / split / cls
                class_dir.mkdir(parents=True, exist_ok=True)
                # a rebuild with fewer images must not keep the old surplus
                for old in [*class_dir.glob("*.jpg"), *class_dir.glob("*.png")]:
                    old.unlink()
                rng = random.Random(f"{seed}:{gen}:{split}:{cls}")
                for i in range(per_class):
                    img = _random_crop(photos, rng, crop_height, crop_width, brightness)
                    if cls == "nature":
                        quality = rng.randint(*jpeg_quality)
                        img.save(class_dir / f"{i:05d}.jpg", format="JPEG", quality=quality)
                    else:
                        img = _regenerate(img, rng, ai_downscale, upsampler, checkerboard)
                        img.save(class_dir / f"{i:05d}.png", format="PNG", compress_level=png_compress_level)
    logger.info("demo tree with %s in %s", ", ".join(generators), root)
    return root


def make_demo_shards(
    out: str | Path = "data_shards/demo",
    *,
    work_dir: str | Path | None = None,
    max_count: int = 200,
    progress: bool = True,
    **tree_kwargs: Any,
) -> dict[str, Any]:
    """Build the demo tree (in `work_dir`, or a temporary dir removed afterwards) and shard it."""
    seed = int(tree_kwargs.get("seed", 0))
    with tempfile.TemporaryDirectory(prefix="ds_trainer_demo_") as tmp:
        base = Path(work_dir) if work_dir is not None else Path(tmp)
        tree = build_demo_tree(base / "genimage_demo", **tree_kwargs)
        manifest = shard_genimage(tree, out, max_count=max_count, seed=seed, progress=progress).manifest
    # record how the data was made: the temporary source path alone would explain nothing
    bound = inspect.signature(build_demo_tree).bind(base, **tree_kwargs)
    bound.apply_defaults()
    params = {k: v for k, v in bound.arguments.items() if k != "out"}
    manifest["demo"] = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
    if work_dir is None:
        manifest["source"] = "ds_trainer.data.demo.build_demo_tree (temporary directory)"
    rewrite_manifest(out, manifest)
    return manifest
