"""Faster decoders and uint8 batches: decode time vs Pillow, and loader img/s float vs uint8, alternated in one run.

Part 1 decodes distinct images (the SD v1.4-like mix of benchmarks/prepared_shards.py: fakes 512² PNG, reals JPEG
q96 around 500x375, plus 1024² PNG fakes as Midjourney's) with Pillow and with `data.fast_decode` (pyspng /
simplejpeg), each through the loader's header check, and reports the time ratio per kind. Part 2 reads the mix
through `make_shard_loader(train=True)` with one DataLoader worker (so batches cross the worker queue), the
default preprocessing (crop resize to 224, no draft), in four variants: Pillow or fast decode, float or uint8
batches; the consumer runs `batches.unpack` (normalisation, on this CPU, for uint8), and once not (on a GPU it
is a kernel on the device, off the host). Variants alternate.

    python benchmarks/decode_path.py                  # ~3 minutes on 2 busy cores
    python benchmarks/decode_path.py --images 24 --rounds 1 --out /tmp/d.json   # smoke

The result goes to benchmarks/results/decode_path.json (`--out`), through common.write_result.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import md_table, write_result
from prepared_shards import _image, _photos, write_tree

from ds_trainer import batches
from ds_trainer.data import decode, fast_decode, make_shard_loader
from ds_trainer.data.image_limits import open_checked
from ds_trainer.data.shards import shard_genimage
from ds_trainer.data.transforms import Preprocess

KINDS = {"PNG 512²": ("PNG", (512, 512)), "PNG 1024²": ("PNG", (1024, 1024)), "JPEG q96 ~500x375": ("JPEG", None)}
LOADER_VARIANTS = [  # (name, fast decoders, uint8 batches, the consumer normalises on this CPU)
    ("Pillow, float", False, False, True), ("fast, float", True, False, True), ("Pillow, uint8", False, True, True),
    ("fast, uint8", True, True, True), ("fast, uint8, normalised elsewhere (a GPU)", True, True, False),
]  # fmt: skip
BASELINE = "Pillow, float"


def _files(n: int) -> dict[str, list[bytes]]:
    photos, out = _photos(), {}
    for kind, (fmt, size) in KINDS.items():
        out[kind] = []
        for i in range(n):
            wh = size or (500 + (i % 7) * 10 - 30, 375 - (i % 5) * 8)
            buf = io.BytesIO()
            _image(photos, 1000 * len(out) + i, wh).save(buf, format=fmt, quality=96)
            out[kind].append(buf.getvalue())
    return out


def _decode_seconds(files: list[bytes], fast: bool) -> float:
    start = time.perf_counter()
    for data in files:
        img = open_checked(io.BytesIO(data))
        img = fast_decode.decoded(img, data) if fast else img
        np.asarray(img)  # the pixels (Pillow decodes here)
        img.close()
    return time.perf_counter() - start


def _loader_rate(shards: Path, fast: bool, uint8: bool, unpack: bool, batch_size: int) -> float:
    real = fast_decode.fast_formats
    decode.fast_formats = real if fast else (lambda preprocess: frozenset())  # forked into the worker
    try:
        pre = Preprocess(image_size=224, draft=False, uint8=uint8)
        loader = make_shard_loader(shards, "train", batch_size=batch_size, train=True, num_workers=1,
                                   shuffle_buffer=32, preprocess=pre, pin_memory=False)  # fmt: skip
        loader.set_epoch(0)
        start, n = time.perf_counter(), 0
        for batch in loader:
            x = batches.unpack(batch, torch.device("cpu"), torch.float32)[0] if unpack else batch["pixel_values"]
            n += x.shape[0]
        return n / (time.perf_counter() - start)
    finally:
        decode.fast_formats = real


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=240, help="distinct images in the loader's mix (default 240)")
    p.add_argument("--decode-images", type=int, default=30, help="distinct files per kind in part 1")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds over every variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/decode_path.json)")
    args = p.parse_args(argv)
    if fast_decode._module("pyspng") is None or fast_decode._module("simplejpeg") is None:
        sys.exit("decode_path: pyspng and simplejpeg are not installed (pip install -r requirements.txt)")
    files = _files(args.decode_images)
    secs: dict[str, dict[bool, list[float]]] = {k: {False: [], True: []} for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root / "src", args.images)
        shard_genimage(root / "src", root / "shards", max_count=64, workers=1, progress=False)
        rates: dict[str, list[float]] = {name: [] for name, *_ in LOADER_VARIANTS}
        for _ in range(args.rounds):
            for kind in KINDS:
                for fast in (False, True):
                    secs[kind][fast].append(_decode_seconds(files[kind], fast))
            for name, fast, uint8, unpack in LOADER_VARIANTS:
                rates[name].append(_loader_rate(root / "shards", fast, uint8, unpack, args.batch_size))
    speedup = {k: statistics.median(s[False]) / statistics.median(s[True]) for k, s in secs.items()}
    per_image = {k: {v: 1e3 * statistics.median(s[v]) / args.decode_images for v in (False, True)}
                 for k, s in secs.items()}  # fmt: skip
    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median[BASELINE]
    decode_rows = [[k, f"{per_image[k][False]:.2f}", f"{per_image[k][True]:.2f}", f"x{speedup[k]:.2f}"] for k in KINDS]
    loader_rows = [[n, f"{median[n]:.1f}", f"{min(rates[n]):.1f}-{max(rates[n]):.1f}", f"x{median[n] / base:.2f}"]
                   for n, *_ in LOADER_VARIANTS]  # fmt: skip
    summary = (
        "decode vs Pillow: " + ", ".join(f"{k} x{v:.2f}" for k, v in speedup.items())
        + f"; loader (1 worker) fast+uint8 x{median['fast, uint8'] / base:.2f}, uint8 alone "
        f"x{median['Pillow, uint8'] / base:.2f} of Pillow+float ({base:.1f} img/s)"
    )  # fmt: skip
    markdown = (
        f"**{summary}**\n\n{md_table(['file', 'Pillow ms', 'fast ms', 'speed-up'], decode_rows)}\n\n"
        f"{md_table(['loader variant', 'img/s', 'range', 'vs Pillow, float'], loader_rows)}\n\n"
        f"Decode: {args.decode_images} distinct files per kind, header check included. Loader: {args.images} "
        f"distinct images (fakes 512² PNG, reals JPEG q96), train loader with 1 worker, crop resize 224, no draft, "
        f"batch {args.batch_size}, the consumer normalising uint8 batches on this CPU (last row: not, as on a GPU, "
        f"where it is a device kernel); median of {args.rounds} "
        "alternating rounds. One run on a shared machine: compare rows, not absolute numbers."
    )
    write_result("decode_path", args.out, argv, summary, markdown, decode_seconds=secs, decode_speedup=speedup,
                 loader_rates=rates, loader_median=median, images=args.images)  # fmt: skip


if __name__ == "__main__":
    main()
