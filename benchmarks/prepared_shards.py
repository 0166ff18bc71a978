"""Loader img/s on prepared shards (`ds-trainer prepare`) vs the source set with load-time JPEG alignment.

An SD v1.4-like mix of distinct images (every one its own crop, scale and noise of a photo, no copies):
fakes 512² PNG, reals JPEG q96 around 500x375. It is sharded, then prepared three ways
(`--align-jpeg 96`; `+ --resize-shortest 224` stored as JPEG; the same stored raw), and each set is
read by `make_shard_loader(train=True)` in the main process (one core, no worker start-up) with
the default preprocessing (crop resize to 224, no draft) and `data.align_jpeg_quality: 96`, which
the source set applies at load time and the prepared ones already hold. Variants alternate within
each round; the table has the median img/s over rounds and the ratio to the source with load-time
alignment.

    python benchmarks/prepared_shards.py                    # ~2 minutes on 2 busy cores
    python benchmarks/prepared_shards.py --images 40 --rounds 1 --out /tmp/p.json   # smoke

The result goes to benchmarks/results/prepared_shards.json (`--out`), through common.write_result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import md_table, write_result

from ds_trainer.data import make_shard_loader
from ds_trainer.data.prepare import Preparation, prepare_shards
from ds_trainer.data.shards import shard_genimage
from ds_trainer.data.transforms import Preprocess

QUALITY = 96
VARIANTS = [  # (name, preparation or None for the source set, data.align_jpeg_quality)
    ("source, no alignment", None, None),
    ("source, load-time align 96", None, QUALITY),
    ("prepared --align-jpeg 96", Preparation(QUALITY), QUALITY),
    ("prepared --align-jpeg 96 --resize-shortest 224", Preparation(QUALITY, 224), QUALITY),
    ("prepared --align-jpeg 96 --resize-shortest 224 --store raw", Preparation(QUALITY, 224, "raw"), QUALITY),
]
BASELINE = "source, load-time align 96"


def _photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images

        return [np.asarray(i) for i in load_sample_images().images]
    except ImportError:
        rng = np.random.default_rng(0)
        coarse = [rng.integers(0, 256, (27, 40, 3), dtype=np.uint8) for _ in range(2)]
        return [np.asarray(Image.fromarray(c).resize((640, 427), Image.Resampling.BICUBIC)) for c in coarse]


def _image(photos: list[np.ndarray], seed: int, size: tuple[int, int]) -> Image.Image:
    """A distinct image: a random crop of a photo at a random scale, resized to `size`, with sensor-like noise."""
    rng = np.random.default_rng(seed)
    photo = photos[seed % len(photos)]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = Image.fromarray(photo[top : top + ch, left : left + cw]).resize(size, Image.Resampling.BICUBIC)
    noise = rng.normal(0, 2.0, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_tree(src: Path, images: int) -> None:
    photos = _photos()
    for i in range(images):
        label = "ai" if i % 2 else "nature"
        folder = src / "sdv14" / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        if label == "ai":
            _image(photos, i, (512, 512)).save(folder / f"{i:05d}.png")
        else:
            size = (500 + int(i % 7) * 10 - 30, 375 - int(i % 5) * 8)  # ImageNet-like, varied
            _image(photos, i, size).save(folder / f"{i:05d}.jpg", quality=96)


def rate(shards: Path, align: int | None, batch_size: int) -> float:
    """Images/s of one pass of the train loader (main process, one core) over the whole set."""
    pre = Preprocess(image_size=224, align_jpeg_quality=align, draft=False)
    loader = make_shard_loader(shards, "train", batch_size=batch_size, train=True, num_workers=0,
                               shuffle_buffer=32, preprocess=pre, pin_memory=False)  # fmt: skip
    loader.set_epoch(0)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["pixel_values"].shape[0]
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=240, help="distinct images, half fakes (default 240)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over every variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="processes for sharding and preparing")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/prepared_shards.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root / "src", args.images)
        shard_genimage(root / "src", root / "source", max_count=64, workers=args.workers, progress=False)
        sets, disk = {}, {}
        for name, prep, _ in VARIANTS:
            sets[name] = root / "source" if prep is None else root / f"p{len(sets)}"
            if prep is not None:
                prepare_shards(root / "source", sets[name], prep, workers=args.workers, progress=False)
            disk[name] = sum(f.stat().st_size for f in sets[name].rglob("*.tar"))
        rates: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
        for _ in range(args.rounds):
            for name, _, align in VARIANTS:
                rates[name].append(rate(sets[name], align, args.batch_size))
    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median[BASELINE]
    rows = [[n, f"{median[n]:.1f}", f"{min(rates[n]):.1f}-{max(rates[n]):.1f}", f"x{median[n] / base:.2f}",
             f"{disk[n] / 2**20:.1f}"] for n, _, _ in VARIANTS]  # fmt: skip
    table = md_table(["set", "img/s (1 core)", "range", "vs load-time align", "disk MiB"], rows)
    best = max((n for n, p, _ in VARIANTS if p is not None), key=median.get)
    summary = (f"prepared --align-jpeg 96: x{median[VARIANTS[2][0]] / base:.2f} the source with load-time "
               f"alignment ({base:.1f} img/s per core); best {best}: x{median[best] / base:.2f}")  # fmt: skip
    markdown = (
        f"**{summary}**\n\n{table}\n\n{args.images} distinct images (fakes 512² PNG, reals JPEG q96 ~500x375), "
        f"train loader in the main process, crop resize 224, no draft, batch {args.batch_size}; median of "
        f"{args.rounds} alternating rounds. One run on a shared machine: compare rows, not absolute numbers."
    )
    write_result("prepared_shards", args.out, argv, summary, markdown,
                 rates=rates, median=median, disk_bytes=disk, images=args.images)  # fmt: skip


if __name__ == "__main__":
    main()
