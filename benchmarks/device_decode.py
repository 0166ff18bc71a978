"""Images/s of data.decode gpu's batch decoder (device_decode.decode_batch) against the workers' CPU path.

Synthetic photo-like JPEGs at ImageNet-like sizes (q96, GenImage's reals) are shipped as the workers ship them
(`DeviceJpeg.ship`: header, crop draws, bytes), then decoded, resized, cropped and normalised in batches:
on CUDA with torchvision's batched nvJPEG, and (`--cpu`) with the CPU fallback. The CPU path's row is one
worker process's rate (Pillow/simplejpeg decode + Pillow resize + crop, `Preprocess(uint8=True)`), the number
a worker count multiplies. Without CUDA torchvision and without `--cpu` it exits 2 with one line: the GPU
rate is only measured on a GPU machine.

    python benchmarks/device_decode.py                 # on a GPU: nvJPEG rows + the one-worker CPU row
    python benchmarks/device_decode.py --cpu --images 32 --batch 8   # smoke test of the CPU fallback
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from synthetic_images import REAL_SIZES, synthetic_image  # noqa: E402 - importable once the folder is on sys.path


def _jpegs(n: int, quality: int) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        synthetic_image(i, REAL_SIZES[i % len(REAL_SIZES)]).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _batches(jpegs: list[bytes], size: int, batch: int) -> list[dict]:
    from ds_trainer.data.decode import collate
    from ds_trainer.data.device_decode import DeviceJpeg
    from ds_trainer.data.transforms import Preprocess

    ship = DeviceJpeg(Preprocess(image_size=size, draft=False, uint8=True, decode="gpu")).ship
    items = [{**ship({"__key__": str(i), "jpg": d}, random.Random(i)), "label": i % 2, "generator": "g",
              "key": str(i), "bad": 0, "worker": 0, "position": i} for i, d in enumerate(jpegs)]  # fmt: skip
    return [collate(items[i : i + batch]) for i in range(0, len(items) - batch + 1, batch)]


def _rate_device(batches: list[dict], device: torch.device, repeats: int) -> float:
    from ds_trainer.data.device_decode import decode_batch
    from ds_trainer.data.transforms import normalize

    def once() -> int:
        n = 0
        for b in batches:
            n += normalize(decode_batch(dict(b), device)).shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n

    once()  # warm-up: nvJPEG handles, kernels
    start, n = time.perf_counter(), 0
    for _ in range(repeats):
        n += once()
    return n / (time.perf_counter() - start)


def _rate_cpu_worker(jpegs: list[bytes], size: int) -> float:
    from PIL import Image

    from ds_trainer.data.transforms import Preprocess

    pre = Preprocess(image_size=size, draft=False, uint8=True)
    start = time.perf_counter()
    for i, d in enumerate(jpegs):
        with Image.open(io.BytesIO(d)) as img:
            pre(img, i % 2, train=True, rng=random.Random(i))
    return len(jpegs) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--quality", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="time the CPU fallback instead of requiring CUDA")
    p.add_argument("--out", default=None, help="write the JSON row here")
    args = p.parse_args(argv)
    from ds_trainer.data.device_decode import gpu_decoder_available

    cuda = torch.cuda.is_available() and gpu_decoder_available()
    if not cuda and not args.cpu:
        print("device_decode: no CUDA torchvision here (nvJPEG); run on a GPU machine, or --cpu", file=sys.stderr)
        return 2
    jpegs = _jpegs(args.images, args.quality)
    batches = _batches(jpegs, args.size, args.batch)
    row = {"images": args.images, "batch": args.batch, "size": args.size, "quality": args.quality,
           "cpu_worker_images_per_s": round(_rate_cpu_worker(jpegs, args.size), 1)}  # fmt: skip
    device = torch.device("cuda" if cuda else "cpu")
    row[f"decode_batch_{device.type}_images_per_s"] = round(_rate_device(batches, device, args.repeats), 1)
    if cuda:
        row["gpu"] = torch.cuda.get_device_name(device)
    text = json.dumps(row)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
