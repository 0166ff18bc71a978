"""data.decode gpu on a CPU: the same keys, labels, crops and flips as the CPU path; pixels within a tolerance.

The device decoder's CPU fallback (simplejpeg or Pillow) decodes to Pillow's pixels, so the only difference
from the CPU path is the resize: torch's antialiased bicubic in float (two passes, rounded to 8 bits in
between as Pillow does) against Pillow's fixed-point one. Measured on these sets (prepared demo photos and
random noise, down- and upscaled): 0.01 % to 0.14 % of the pixels off by 1 or 2 levels (mean |diff| at most
0.0014), max 2; without a resize the two paths are bit-identical. nvJPEG's IDCT may add a level or two on a
GPU; that is not measured here.
"""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from ds_trainer import batches
from ds_trainer.config import DataSection
from ds_trainer.data import make_shard_loader
from ds_trainer.data.decode import collate
from ds_trainer.data.device_decode import DeviceJpeg, decode_batch
from ds_trainer.data.perturb import Perturbation
from ds_trainer.data.prepare import Preparation, prepare_shards
from ds_trainer.data.shards import shard_genimage
from ds_trainer.data.transforms import Preprocess, normalize, to_rgb, to_uint8_tensor
from ds_trainer.errors import ConfigError, DataError

CPU = torch.device("cpu")
MEAN_TOLERANCE = 0.02  # of 255 levels, over a set's pixels (measured at most 0.0014)
MAX_TOLERANCE = 3  # one pixel (measured 2)


@pytest.fixture(scope="module")
def jpeg_sets(tmp_path_factory, tiny_shards, make_tree) -> dict[str, Path]:
    """Every sample a JPEG: the demo set and a noise set of odd sizes, both with the fakes aligned at q96."""
    root = tmp_path_factory.mktemp("device-decode")
    make_tree(root / "src", {"g_wide": {"train": (6, 6), "val": (3, 3)}}, size=(60, 45))
    make_tree(root / "src", {"g_tall": {"train": (6, 6), "val": (3, 3)}}, size=(41, 70))
    shard_genimage(root / "src", root / "noise-src", max_count=5, workers=1, progress=False)
    sets = {"demo": tiny_shards, "noise": root / "noise-src"}
    for name, src in sets.items():
        prepare_shards(src, root / name, Preparation(96), workers=1, progress=False)
    prepare_shards(tiny_shards, root / "raw", Preparation(96, store="raw"), workers=1, progress=False)
    return {name: root / name for name in (*sets, "raw")}


def _pre(size: int, decode: str = "cpu") -> Preprocess:
    return Preprocess(image_size=size, draft=False, uint8=True, align_jpeg_quality=96, decode=decode)


def _loader(shards: Path, split: str, pre: Preprocess, train: bool, workers: int = 0, **kw):
    loader = make_shard_loader(shards, split, batch_size=4, train=train, num_workers=workers,
                               image_size=pre.image_size, preprocess=pre, seed=3, shuffle_buffer=8, **kw)  # fmt: skip
    loader.set_epoch(1)
    return loader


def _pillow_reference(jpeg: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """The shipped geometry applied with the CPU path's own operations (Pillow decode, resize, crop, flip)."""
    _, _, rw, rh, left, top, side, flip, _ = geometry.tolist()
    with Image.open(io.BytesIO(jpeg.numpy().tobytes())) as img:
        img = to_rgb(img)
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + side, top + side))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(img)


CASES = [("demo", 64), ("demo", 224), ("noise", 32), ("noise", 64)]  # 224: no resize; noise at 64: upscaled


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, size", CASES)
def test_keys_labels_and_geometry_are_the_cpu_paths(jpeg_sets, name, size, train):
    split = "train" if train else "val"
    want = list(_loader(jpeg_sets[name], split, _pre(size), train))
    got = list(_loader(jpeg_sets[name], split, _pre(size, "gpu"), train))
    assert want and "pixel_values" not in got[0] and "jpeg" in got[0]
    for key in ("key", "generator", "size", "bad_samples", "worker", "position"):
        assert [b[key] for b in got] == [b[key] for b in want], key
    assert [b["labels"].tolist() for b in got] == [b["labels"].tolist() for b in want]
    flips = 0
    for g, w in zip(got, want):
        for i, jpeg in enumerate(g["jpeg"]):
            # the crop box and flip the worker drew, applied with Pillow, give the CPU path's pixels exactly
            assert torch.equal(_pillow_reference(jpeg, g["geometry"][i]), w["pixel_values"][i]), g["key"][i]
            flips += int(g["geometry"][i][7])
    assert (flips > 0) == train  # eval is a deterministic centre crop, train flips about half


@pytest.mark.parametrize("name, size", CASES)
def test_pixels_are_within_tolerance_of_the_cpu_path(jpeg_sets, name, size):
    diffs = []
    for train in (True, False):
        want = _loader(jpeg_sets[name], "train" if train else "val", _pre(size), train)
        got = _loader(jpeg_sets[name], "train" if train else "val", _pre(size, "gpu"), train)
        for g, w in zip(got, want):
            pixels = decode_batch(dict(g), CPU)
            assert pixels.dtype == torch.uint8 and pixels.shape == w["pixel_values"].shape
            diffs.append((pixels.to(torch.int16) - w["pixel_values"].to(torch.int16)).abs().flatten())
    diff = torch.cat(diffs).float()
    assert diff.mean() <= MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (diff.mean(), diff.max())
    if size == 224:  # no resize: the CPU fallback decodes to Pillow's pixels, and a crop is a crop
        assert diff.max() == 0


def test_unpack_decodes_and_normalises(jpeg_sets):
    batch = next(iter(_loader(jpeg_sets["demo"], "val", _pre(64, "gpu"), False)))
    inputs, targets = batches.unpack(dict(batch), CPU, torch.float32)
    assert torch.equal(inputs, normalize(decode_batch(dict(batch), CPU)))
    assert inputs.shape == (4, 3, 64, 64) and torch.equal(targets, batch["labels"])


def test_mid_epoch_resume_gives_the_same_continuation(jpeg_sets):
    pre = _pre(32, "gpu")
    full = list(_loader(jpeg_sets["noise"], "train", pre, True, workers=2))
    first = _loader(jpeg_sets["noise"], "train", pre, True, workers=2)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    resumed = _loader(jpeg_sets["noise"], "train", pre, True, workers=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(full) == len(first) and len(rest) == len(full) - 2
    for a, b in zip(rest, full[2:]):
        assert a["key"] == b["key"] and torch.equal(a["geometry"], b["geometry"])
        assert all(torch.equal(x, y) for x, y in zip(a["jpeg"], b["jpeg"]))


def test_every_rank_gets_the_same_number_of_batches(jpeg_sets):
    lens = []
    for rank in (0, 1):
        loader = _loader(jpeg_sets["demo"], "train", _pre(64, "gpu"), True, rank=rank, world_size=2)
        lens.append((len(loader), len(list(loader))))
    assert lens[0] == lens[1] and lens[0][0] == lens[0][1] > 0


def test_a_non_jpeg_sample_refuses_the_run_naming_it(tiny_shards):
    pre = dataclasses.replace(_pre(64, "gpu"), align_jpeg_quality=None)  # the demo's fakes are PNG files
    with pytest.raises(DataError, match=r"sample \S+ of .* is a \.png member: prepare the set with ds-trainer prepare"):
        list(_loader(tiny_shards, "val", pre, False))


@pytest.mark.parametrize(
    "set_name, change, pattern",
    [
        ("raw", {}, r"prepared with --store raw"),
        ("demo-source", {}, r"data\.align_jpeg_quality 96 re-encodes the fakes in the loader workers"),
        ("demo", {"perturb": Perturbation("jpeg", 75)}, r"a perturbation .* data\.decode: cpu"),
    ],
    ids=["raw-store", "load-time-align", "perturbation"],
)
def test_what_only_the_cpu_path_does_is_refused(jpeg_sets, tiny_shards, set_name, change, pattern):
    shards = tiny_shards if set_name == "demo-source" else jpeg_sets[set_name]
    with pytest.raises(ConfigError, match=pattern):
        _loader(shards, "val", dataclasses.replace(_pre(64, "gpu"), **change), False)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"crop": "native"}, r"needs crop: resize"),
        ({"blur_prob": 0.5}, r"blur_prob \(0\.5\) and jpeg_prob \(0\)"),
        ({"jpeg_prob": 0.1}, r"jpeg_prob \(0\.1\)"),
        ({"jpeg_draft": True}, r"jpeg_draft .* set it false"),
    ],
)
def test_config_refuses_decode_gpu_with_worker_side_steps(data, pattern):
    with pytest.raises(ValidationError, match=pattern):
        DataSection(decode="gpu", **data)
    DataSection(decode="cpu", **data)  # the CPU path takes them


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(key: str, data: bytes) -> dict:
    return {"__key__": key, "__url__": "t.tar", "jpg": data}


def test_a_truncated_jpeg_is_a_bad_sample_in_the_worker():
    data = _jpeg(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))  # the header is whole
    with pytest.raises(ValueError, match="no end marker"):
        DeviceJpeg(_pre(32, "gpu")).ship(_sample("k", data[: len(data) // 2]), None)


def test_a_jpeg_that_fails_on_the_device_is_dropped_and_counted():
    """Its header opens and it ends in EOI, but it has no scan: Pillow and simplejpeg refuse it, as the CPU path."""
    good = _jpeg(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    broken = good[: good.find(b"\xff\xda")] + b"\xff\xd9"
    ship = DeviceJpeg(_pre(32, "gpu")).ship
    items = [{**ship(_sample(k, d), random.Random(k)), "label": i % 2, "generator": "g", "key": k, "bad": 0,
              "worker": 0, "position": i + 1} for i, (k, d) in enumerate([("a", good), ("b", broken), ("c", good)])]  # fmt: skip
    batch = collate(items)
    pixels = decode_batch(batch, CPU)
    assert pixels.shape == (2, 3, 32, 32)
    assert batch["key"] == ["a", "c"] and batch["labels"].tolist() == [0, 0] and batch["bad_samples"] == 1
    batch = collate(items[1:2])
    with pytest.raises(DataError, match="a batch held no JPEG that decodes"):
        decode_batch(batch, CPU)
