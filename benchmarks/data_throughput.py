"""Can the data loader feed the training step? Images/s of the shard loader vs the train step.

For each GenImage-like image size and format (JPEG like the reals, lossless PNG like the fakes)
this writes a small temporary shard set with `ds_trainer.data.shards.shard_genimage`, streams it
with `make_shard_loader(train=True)` and a `Preprocess` (decode, augment, crop, normalise), and
times only steady-state batches (after every worker delivered its first one). It then times
forward + backward + AdamW step of the model on CPU for the same batch size. The last column,
cores/step, is how many loader cores it takes to keep that step busy; on a GPU the step is far
faster than here, so scale it by the GPU step rate you measure there.

    python benchmarks/data_throughput.py                      # defaults: about 2 minutes on 2 busy cores
    python benchmarks/data_throughput.py --sizes 512,1024 --workers 2 --crop native
    python benchmarks/data_throughput.py --model openai/clip-vit-base-patch32   # must be available locally

With crop=resize and --draft, JPEGs of at least twice the crop size are also timed without the
draft fast path (PIL `Image.draft`: libjpeg decodes at 1/2, 1/4 or 1/8 scale) and the speed-up
is printed.

The result goes to benchmarks/results/data_throughput.json (`--out`), through common.write_result.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# The model must be local: a benchmark should not hang on, or wait for, a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import md_table, write_result
from ds_trainer.data.pipeline import make_shard_loader
from ds_trainer.data.shards import shard_genimage
from ds_trainer.data.transforms import Preprocess

FORMATS = {"jpeg": ("jpg", {"format": "JPEG", "quality": 96}), "png": ("png", {"format": "PNG"})}
UNIQUE_IMAGES = 4  # distinct encodes per size/format; the tree repeats them via symlinks


@dataclass
class Row:
    size: int
    fmt: str
    loader: float  # images/s
    workers: int  # worker processes actually used (0 = main process)

    @property
    def per_core(self) -> float:
        return self.loader / max(self.workers, 1)


def _photo(seed: int) -> Image.Image:
    """A real photo when scikit-learn is there (its sample images), else smooth noise."""
    try:
        from sklearn.datasets import load_sample_images

        return Image.fromarray(load_sample_images().images[seed % 2])
    except ImportError:
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, (27, 40, 3), dtype=np.uint8)
        return Image.fromarray(coarse).resize((640, 427), Image.Resampling.BICUBIC)


def _synthetic(size: int, seed: int) -> Image.Image:
    """A size x size crop of a photo, resized, plus mild sensor-like noise.

    The noise keeps upscaled images from being unrealistically smooth, which would make PNG
    decoding (and JPEG encoding) cheaper than on GenImage's real files.
    """
    photo = _photo(seed)
    w, h = photo.size
    side = min(w, h) - 8 * (seed // 2)
    left, top = (w - side) // 2 + 5 * seed, (h - side) // 2
    img = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    if seed % 3 == 1:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    noise = np.random.default_rng(seed).normal(0, 2.0, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _write_tree(src: Path, sizes: list[int], formats: list[str], per_set: int) -> None:
    """GenImage layout <src>/<fmt><size>/train/{ai,nature}/ with `per_set` images per set."""
    originals = src / "_originals"
    originals.mkdir(parents=True)
    for size in sizes:
        for fmt in formats:
            ext, save_args = FORMATS[fmt]
            files = []
            for seed in range(UNIQUE_IMAGES):
                path = originals / f"{fmt}{size}-{seed}.{ext}"
                _synthetic(size, seed).save(path, **save_args)
                files.append(path)
            for i in range(per_set):
                label_dir = src / f"{fmt}{size}" / "train" / ("ai" if i % 2 else "nature")
                label_dir.mkdir(parents=True, exist_ok=True)
                (label_dir / f"{i:05d}.{ext}").symlink_to(files[i % len(files)])


def steady_rate(loader: Any, batches: int) -> tuple[float, int]:
    """(steady-state images/s of a ShardLoader, its worker processes).

    The clock starts once every worker has delivered its first batch (worker start-up excluded),
    then `batches` batches are timed; the loader must be at least workers + batches long.
    """
    workers = loader.plan().num_workers
    warm = max(workers, 1)
    if len(loader) < warm + batches:
        raise ValueError(f"the loader has {len(loader)} batches; timing {batches} after {warm} needs {warm + batches}")
    start = 0.0
    timed = 0
    for i, batch in enumerate(loader):
        if i == warm - 1:
            start = time.perf_counter()
        elif i >= warm:
            timed += batch["pixel_values"].shape[0]
        if i + 1 == warm + batches:
            break
    return timed / (time.perf_counter() - start), workers


def time_loader(shards: Path, generator: str, pre: Preprocess, args: argparse.Namespace) -> Row:
    """Steady-state images/s of the train loader over one synthetic shard set."""
    loader = make_shard_loader(
        shards, "train", batch_size=args.batch_size, train=True, generators=[generator],
        num_workers=args.workers, image_size=pre.image_size, shuffle_buffer=64, preprocess=pre,
    )  # fmt: skip
    rate, workers = steady_rate(loader, args.batches)
    size, fmt = int(generator.lstrip("jpegn")), generator.rstrip("0123456789")
    return Row(size, fmt, rate, workers)


def time_train_step(model_name: str, batch_size: int, steps: int) -> tuple[float, int]:
    """(images/s of forward + backward + AdamW step on CPU, the model's input size)."""
    from ds_trainer.models import CLIPModel

    model = CLIPModel(model_name)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch_size, 3, model.image_size, model.image_size)
    y = torch.randint(0, 2, (batch_size,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up: allocations, lazy init
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start), model.image_size


def write_tree(src: Path, shards: Path, sizes: list[int], formats: list[str], per_set: int, workers: int) -> None:
    """Synthetic GenImage-like shard sets (generators `<fmt><size>`, e.g. jpeg128) of `per_set` train images each.

    At least one shard per worker, or plan_rank would leave workers idle.
    """
    _write_tree(src, sizes, formats, per_set)
    shard_genimage(src, shards, max_count=-(-per_set // max(workers, 1)), workers=1, progress=False)


def _table(rows: list[Row], step_rate: float) -> str:
    head = f"{'size':>6} {'format':>6} {'loader img/s':>13} {'workers':>7} {'img/s/core':>11} {'step img/s':>11}"
    head += f" {'loader/step':>12} {'cores/step':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.size:>5}² {r.fmt:>6} {r.loader:>13.1f} {r.workers:>7} {r.per_core:>11.1f} {step_rate:>11.1f}"
            f" {r.loader / step_rate:>12.2f} {step_rate / r.per_core:>11.1f}"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="128,256,512,1024", help="square image sides, comma-separated")
    p.add_argument("--formats", default="jpeg,png", help="jpeg (GenImage reals), png (fakes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (0 = decode in the main process)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per size/format (after warm-up)")
    p.add_argument("--crop", choices=("resize", "native"), default="resize")
    p.add_argument("--draft", action=argparse.BooleanOptionalAction, default=True, help="JPEG draft decoding")
    p.add_argument("--blur-prob", type=float, default=0.0, help="train augmentation, as data.blur_prob")
    p.add_argument("--jpeg-prob", type=float, default=0.0, help="train augmentation, as data.jpeg_prob")
    p.add_argument("--model", default="tiny", help="'tiny' or a locally available CLIP (hub id or directory)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps")
    # 1 thread: a per-core figure like the loader's; on a shared machine OpenMP threads also spin-wait
    # on each other (2 threads measured 40x slower than 1 here under load)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the train step (0: torch's default)")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/data_throughput.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = [f.strip() for f in args.formats.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        step_rate, image_size = time_train_step(args.model, args.batch_size, args.steps)
    except Exception as exc:  # noqa: BLE001 - a missing or unloadable model: say why, keep nothing
        sys.exit(f"cannot time the train step of {args.model!r}: {exc}")
    print(f"train step: {args.model}, batch {args.batch_size}, {image_size}px, CPU, "
          f"{torch.get_num_threads()} torch threads: {step_rate:.1f} img/s")  # fmt: skip

    pre = Preprocess(image_size=image_size, crop=args.crop, blur_prob=args.blur_prob, jpeg_prob=args.jpeg_prob,
                     draft=args.draft)  # fmt: skip
    per_set = (args.batches + max(args.workers, 1)) * args.batch_size
    with tempfile.TemporaryDirectory(prefix="ds_trainer_bench_") as tmp:
        src, shards = Path(tmp) / "src", Path(tmp) / "shards"
        t0 = time.perf_counter()
        write_tree(src, shards, sizes, formats, per_set, args.workers)
        print(f"wrote {len(sizes) * len(formats)} shard sets of {per_set} images in {time.perf_counter() - t0:.1f}s")
        print(f"loader: crop={args.crop} draft={args.draft} blur_prob={args.blur_prob} jpeg_prob={args.jpeg_prob}\n")

        rows = [time_loader(shards, f"{fmt}{size}", pre, args) for size in sizes for fmt in formats]
        print(_table(rows, step_rate))

        large = [r for r in rows if r.fmt == "jpeg" and r.size >= 2 * image_size]
        drafts = []
        if args.draft and args.crop == "resize" and large:
            print("\ndraft fast path, JPEG (same run):")
            for r in large:
                off = time_loader(shards, f"jpeg{r.size}", replace(pre, draft=False), args)
                drafts.append({"size": r.size, "draft_img_s": r.loader, "no_draft_img_s": off.loader,
                               "speedup": r.loader / off.loader})  # fmt: skip
                print(f"{r.size:>5}²  draft {r.loader:7.1f} img/s  no draft {off.loader:7.1f} img/s  "
                      f"speed-up x{r.loader / off.loader:.2f}")  # fmt: skip
    _write(args, argv, rows, drafts, step_rate, image_size)


def _write(args: argparse.Namespace, argv: list[str] | None, rows: list[Row], drafts: list[dict], step_rate: float,
           image_size: int) -> None:  # fmt: skip
    threads = torch.get_num_threads()
    table = md_table(
        ["image", "format", "loader img/s", "workers", "img/s per worker", "loader / step", "cores to feed the step"],
        [[f"{r.size}²", r.fmt, f"{r.loader:.1f}", r.workers, f"{r.per_core:.1f}", f"{r.loader / step_rate:.2f}",
          f"{step_rate / r.per_core:.1f}"] for r in rows],
    )  # fmt: skip
    if drafts:
        table += "\n\n" + md_table(
            ["JPEG", "draft img/s", "no draft img/s", "speed-up"],
            [[f"{d['size']}²", f"{d['draft_img_s']:.1f}", f"{d['no_draft_img_s']:.1f}", f"x{d['speedup']:.2f}"]
             for d in drafts],
        )  # fmt: skip
    markdown = (
        f"{table}\n\nSteady-state images/s of `make_shard_loader(train=True)` (decode, crop={args.crop}, "
        f"draft={args.draft}, normalise to {image_size} px; batch {args.batch_size}, {args.batches} timed batches "
        "after worker start-up) over synthetic GenImage-like shards (JPEG q96 like the reals, PNG like the fakes), "
        "against the CPU train step "
        f"of `{args.model}` (forward + backward + AdamW, {threads} torch thread(s)): {step_rate:.1f} img/s. "
        "`cores to feed the step` = step rate / loader rate per worker; on a GPU scale it by the GPU step rate. "
        "One run on a shared 2-core machine: compare rows, not absolute numbers."
    )
    slowest, fastest = min(rows, key=lambda r: r.per_core), max(rows, key=lambda r: r.per_core)
    summary = (
        f"loader {slowest.per_core:.1f} img/s per worker ({slowest.size}² {slowest.fmt}) to {fastest.per_core:.1f} "
        f"({fastest.size}² {fastest.fmt}); feeding the {args.model} CPU step ({step_rate:.0f} img/s) takes "
        f"{step_rate / fastest.per_core:.1f}-{step_rate / slowest.per_core:.1f} loader cores"
    )
    settings = {k: getattr(args, k) for k in ("batch_size", "workers", "batches", "crop", "draft", "blur_prob",
                                              "jpeg_prob", "model", "steps")}  # fmt: skip
    settings.update(sizes=sorted({r.size for r in rows}), formats=sorted({r.fmt for r in rows}), threads=threads,
                    image_size=image_size)  # fmt: skip
    write_result(
        "data_throughput", args.out, argv, summary, markdown, settings=settings, step_img_s=step_rate,
        rows=[{"size": r.size, "format": r.fmt, "loader_img_s": r.loader, "workers": r.workers,
               "img_s_per_worker": r.per_core, "loader_over_step": r.loader / step_rate,
               "cores_per_step": step_rate / r.per_core} for r in rows],
        draft=drafts,
    )  # fmt: skip


if __name__ == "__main__":
    main()
