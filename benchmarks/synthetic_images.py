"""Distinct photo-like images for loader benchmarks: every seed gives different content, no copies.

An image is a random smooth colour field (coarse noise upsampled bicubically, at a random scale), a
few random shapes (ellipses, rectangles, lines) in random colours, an optional blur, and sensor-like
Gaussian noise of a random strength. The noise and edges keep PNG and JPEG coding as costly as on
real photos; a smooth or repeated image would flatter the decoder. Seeded with numpy, so a tree is
reproducible, and quick (a 1024² image in tens of milliseconds before encoding).

`write_genimage_tree` writes a GenImage-layout tree <root>/<generator>/<split>/{ai,nature}/, the
fakes as PNG, the reals as JPEG at `real_quality` with ImageNet-like sizes around 500x375.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REAL_SIZES = [(500, 375), (500, 333), (375, 500), (500, 400), (640, 480), (500, 357), (333, 500), (480, 360)]


def synthetic_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A distinct RGB image of `size` (width, height) from `seed`."""
    rng = np.random.default_rng(seed)
    w, h = size
    cells = int(rng.integers(3, 24))
    coarse = rng.integers(0, 256, (max(2, cells * h // w), cells, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 12)))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(1.5, 6.0))
    noisy = np.asarray(img, dtype=np.float32) + noise
    return Image.fromarray(np.clip(noisy, 0, 255, out=noisy).astype(np.uint8))


def _write_range(folder: Path, kind: str, start: int, stop: int, fake_size: int, seed: int, quality: int) -> None:
    for i in range(start, stop):
        if kind == "ai":
            synthetic_image(seed * 1_000_003 + 2 * i + 1, (fake_size, fake_size)).save(folder / f"{i:06d}.png")
        else:
            size = REAL_SIZES[(seed + i) % len(REAL_SIZES)]
            synthetic_image(seed * 1_000_003 + 2 * i, size).save(folder / f"{i:06d}.jpg", quality=quality)


def write_genimage_tree(root: Path, generator: str, fakes: int, reals: int, fake_size: int, *, seed: int,
                        real_seed: int | None = None, real_quality: int = 96, workers: int = 1,
                        split: str = "train") -> None:  # fmt: skip
    """<root>/<generator>/<split>/{ai,nature}/: `fakes` PNGs of fake_size², `reals` JPEGs at `real_quality`.

    Fakes draw seeds from `seed`, reals from `real_seed` (default `seed`): two generators given the
    same `real_seed` get the same real images, as GenImage's generators share ImageNet's reals.
    `workers` processes write chunks of the tree in parallel (the images do not depend on it).
    """
    real_seed = seed if real_seed is None else real_seed
    jobs = []
    for kind, count, kind_seed in (("ai", fakes, seed), ("nature", reals, real_seed)):
        folder = root / generator / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        step = max(1, -(-count // (4 * workers)))
        jobs += [(folder, kind, a, min(a + step, count), fake_size, kind_seed, real_quality)
                 for a in range(0, count, step)]  # fmt: skip
    if workers <= 1:
        for job in jobs:
            _write_range(*job)
        return
    with ProcessPoolExecutor(workers) as pool:
        for future in [pool.submit(_write_range, *job) for job in jobs]:
            future.result()
