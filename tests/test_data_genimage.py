"""GenImageDataset (map-style, no shards) and the offline demo data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ds_trainer.data import (
    GenImageDataset,
    build_demo_tree,
    load_manifest,
    make_demo_shards,
    make_shard_loader,
)
from ds_trainer.errors import DataError


def test_genimage_dataset(tmp_path: Path, make_tree) -> None:
    root = make_tree(tmp_path / "gi", {"g1": {"train": (2, 3), "val": (1, 1)}, "g2": {"train": (1, 1)}})
    ds = GenImageDataset(root, split="train", image_size=32)
    assert len(ds) == len(ds.records) == 7
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == ds.records[0].label and y in (0, 1)
    assert len(GenImageDataset(root, split="val")) == 2
    assert {r.generator for r in GenImageDataset(root, generators=["g2"]).records} == {"g2"}
    size, label = GenImageDataset(root, split="val", transform=lambda im: im.size)[0]
    assert size == (40, 32) and label == 1


def test_genimage_dataset_errors(tmp_path: Path, make_tree) -> None:
    root = make_tree(tmp_path / "gi", {"g1": {"train": (1, 1)}})
    with pytest.raises(DataError, match="unknown split 'test'"):
        GenImageDataset(root, split="test")
    with pytest.raises(DataError, match="no 'val' images"):
        GenImageDataset(root, split="val")


def test_demo_tree_counts_and_formats(tmp_path: Path) -> None:
    root = build_demo_tree(tmp_path / "demo", train_per_class=3, val_per_class=2)
    for gen in ("demo_nearest", "demo_bicubic"):
        for split, n in (("train", 3), ("val", 2)):
            nature = sorted((root / gen / split / "nature").iterdir())
            ai = sorted((root / gen / split / "ai").iterdir())
            assert len(nature) == len(ai) == n
            for path in nature:
                with Image.open(path) as im:
                    assert path.suffix == ".jpg" and im.format == "JPEG"
                    assert im.height == 224 and 224 <= im.width <= 256
            for path in ai:
                with Image.open(path) as im:
                    assert path.suffix == ".png" and im.format == "PNG"
                    assert im.height == 224 and 224 <= im.width <= 256


def test_demo_tree_is_deterministic(tmp_path: Path) -> None:
    kw = dict(train_per_class=2, val_per_class=1, generators=("demo_nearest",))
    a = build_demo_tree(tmp_path / "a", **kw)
    b = build_demo_tree(tmp_path / "b", **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.*"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.*")) and len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_make_demo_shards(tmp_path: Path) -> None:
    manifest = make_demo_shards(
        tmp_path / "shards",
        max_count=4,
        progress=False,
        train_per_class=3,
        val_per_class=2,
        generators=("demo_bicubic",),
    )
    assert manifest["counts"] == {
        "demo_bicubic": {
            "train": {"ai": 3, "nature": 3, "total": 6},
            "val": {"ai": 2, "nature": 2, "total": 4},
        }
    }
    assert manifest["demo"]["checkerboard"] > 0
    assert load_manifest(tmp_path / "shards").raw == manifest
    loader = make_shard_loader(tmp_path / "shards", "val", batch_size=4, train=False, num_workers=0)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 224, 224)
    assert sorted(batch["labels"].tolist()) == [0, 0, 1, 1]
