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


def _tree_with_a_truncated_jpeg(tmp_path: Path, make_tree) -> tuple[Path, Path]:
    """g1/train: 2 ai PNGs and 3 nature JPEGs, the first cut in half; plus desktop droppings that are no images."""
    root = make_tree(tmp_path / "gi", {"g1": {"train": (2, 3), "val": (2, 2)}})
    nature = root / "g1" / "train" / "nature"
    truncated = nature / "nature_000.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (nature / ".DS_Store").write_bytes(b"\0\0\0\1Bud1\0\0\x10\0")
    (nature / "._nature_001.jpg").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X")  # macOS AppleDouble: a hidden file
    (nature / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    return root, truncated


def test_a_truncated_jpeg_is_skipped_named_and_counted_like_the_streaming_loaders(tmp_path, make_tree, caplog,
                                                                                   monkeypatch):  # fmt: skip
    import logging

    from ds_trainer.data.genimage import BadSample

    monkeypatch.setattr(logging.getLogger("ds_trainer"), "propagate", True)  # an earlier in-process run may stop it
    root, truncated = _tree_with_a_truncated_jpeg(tmp_path, make_tree)
    ds = GenImageDataset(root, split="train", image_size=32)
    assert len(ds) == 5  # .DS_Store, ._* and Thumbs.db are passed over by the scan
    with caplog.at_level(logging.WARNING, logger="ds_trainer.data.genimage"):
        items = [ds[i] for i in range(len(ds))]
    bad = [item for item in items if isinstance(item, BadSample)]
    assert [b.path for b in bad] == [str(truncated)] and "truncated" in bad[0].reason
    # Distinct messages: after other in-process runs a record can reach the capture through two handlers.
    said = {r.getMessage() for r in caplog.records if r.name == "ds_trainer.data.genimage"}
    assert said == {f"skipping {truncated}: {bad[0].reason}"}
    batch = GenImageDataset.collate(items)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["bad_samples"] == 1
    assert batch["labels"].tolist() == [1, 1, 0, 0]
    assert GenImageDataset.collate([bad[0]])["labels"].numel() == 0


def test_the_trainer_counts_bad_files_of_a_folder_and_stops_above_max_bad_fraction(tmp_path, make_tree):
    from torch.utils.data import DataLoader

    from ds_trainer import CLIPModel, Trainer
    from ds_trainer.config import build_config

    root, _ = _tree_with_a_truncated_jpeg(tmp_path, make_tree)
    val_jpeg = root / "g1" / "val" / "nature" / "nature_000.jpg"
    val_jpeg.write_bytes(val_jpeg.read_bytes()[:200])

    def trainer(limit: float, batch_size: int = 2) -> Trainer:
        name = f"{limit}_{batch_size}"
        cfg = build_config({
            "data": {"max_bad_fraction": limit},
            "training": {"num_epochs": 1, "batch_size": batch_size, "checkpoint_dir": str(tmp_path / f"ckpt{name}"),
                         "monitor": "train_loss"},
            "logging": {"run_dir": str(tmp_path / f"run{name}"), "tensorboard": False},
        })  # fmt: skip
        # The README's loader, torch's default collate and all: the Trainer batches with the dataset's own.
        train = DataLoader(GenImageDataset(root, split="train"), batch_size=batch_size, shuffle=False)
        val = DataLoader(GenImageDataset(root, split="val"), batch_size=1)  # one batch holds only the bad file
        return Trainer(CLIPModel("tiny"), train, val, config=cfg, device="cpu")

    rows = trainer(0.5).train()
    assert rows[0]["train_bad_samples"] == 1 and rows[0]["val_bad_samples"] == 1 and rows[0]["val_samples"] == 3
    with pytest.raises(DataError, match=r"1 of 5 training samples \(20.0%\) could not be decoded, above "
                                         r"data.max_bad_fraction 0.01; the warnings above name them"):  # fmt: skip
        trainer(0.01).train()
    # A training batch of nothing but bad files: said at once (this rank cannot skip a step the others take).
    with pytest.raises(DataError, match=r"epoch 1: a training batch held no usable image \(1 bad; the warnings"):
        trainer(0.5, batch_size=1).train()
