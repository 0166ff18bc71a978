"""GenImage scanning, shard writing and manifest loading."""

from __future__ import annotations

import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from ds_trainer.data import load_manifest, scan_genimage, write_shards
from ds_trainer.data.shards import _scan
from ds_trainer.errors import DataError


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


# ---------------------------------------------------------------- scan


def test_scan_layout_labels_and_case_insensitive_extensions(tmp_path: Path, make_tree) -> None:
    root = make_tree(tmp_path / "gi", {"g1": {"train": (2, 3), "val": (1, 1)}, "g2": {"train": (1, 1)}})
    ai = root / "g1" / "train" / "ai"
    Image.new("RGB", (8, 8)).save(ai / "upper.PNG")
    Image.new("RGB", (8, 8)).save(ai / "mixed.JpEg", format="JPEG")
    (ai / "notes.txt").write_text("junk")
    (root / "g1" / "val" / "nature" / "Thumbs.db").write_bytes(b"\0")

    records, skipped = _scan(root)
    assert sum(skipped.values()) == 2
    by = Counter((r.generator, r.split, r.label) for r in records)
    assert by == {("g1", "train", 1): 4, ("g1", "train", 0): 3, ("g1", "val", 1): 1, ("g1", "val", 0): 1,
                  ("g2", "train", 1): 1, ("g2", "train", 0): 1}
    names = {r.path.name for r in records}
    assert {"upper.PNG", "mixed.JpEg"} <= names and "notes.txt" not in names
    assert records == scan_genimage(root)  # sorted, reproducible


def test_scan_generator_filter(tmp_path: Path, make_tree) -> None:
    root = make_tree(tmp_path / "gi", {"g1": {"train": (1, 1)}, "g2": {"train": (1, 1)}})
    assert {r.generator for r in scan_genimage(root, ["g2"])} == {"g2"}
    with pytest.raises(DataError, match="nope.*available: g1, g2"):
        scan_genimage(root, ["nope"])


def test_scan_missing_or_empty_src(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_genimage(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "stray_dir").mkdir()
    with pytest.raises(DataError, match="no generator folders.*stray_dir"):
        scan_genimage(tmp_path / "empty")


# ---------------------------------------------------------------- write_shards


@pytest.fixture
def shard_set(tmp_path: Path, make_tree) -> tuple[Path, Path, dict]:
    src = make_tree(tmp_path / "gi", {"g.1": {"train": (12, 11), "val": (3, 2)}, "g2": {"train": (4, 4)}})
    (src / "g2" / "train" / "ai" / "readme.md").write_text("junk")
    out = tmp_path / "shards"
    manifest = write_shards(src, out, max_count=10, seed=3, progress=False)
    return src, out, manifest


def test_round_trip_bytes_keys_and_metadata(shard_set) -> None:
    src, out, manifest = shard_set
    seen_keys: set[str] = set()
    for entry in manifest["shards"]:
        samples = _tar_samples(out / entry["path"])
        assert len(samples) == entry["count"]
        labels = []
        for key, files in samples.items():
            assert "." not in key and "/" not in key
            assert key not in seen_keys
            seen_keys.add(key)
            meta = json.loads(files["json"])
            original = src / meta["path"]
            image_ext = "png" if original.suffix == ".png" else "jpg"
            assert files[image_ext] == original.read_bytes()  # stored unchanged
            assert set(files) == {image_ext, "cls", "json"}
            assert int(files["cls"]) == meta["label"] == (1 if "/ai/" in meta["path"] else 0)
            assert (meta["generator"], meta["split"]) == (entry["generator"], entry["split"])
            assert (meta["width"], meta["height"]) == Image.open(original).size
            labels.append(meta["label"])
        assert (entry["ai"], entry["nature"]) == (sum(labels), len(labels) - sum(labels))
    assert len(seen_keys) == 12 + 11 + 3 + 2 + 4 + 4


def test_manifest_counts_and_shard_mixing(shard_set) -> None:
    _, out, manifest = shard_set
    assert manifest["counts"] == {
        "g.1": {"train": {"ai": 12, "nature": 11, "total": 23}, "val": {"ai": 3, "nature": 2, "total": 5}},
        "g2": {"train": {"ai": 4, "nature": 4, "total": 8}},
    }
    assert manifest["skipped"]["non_image"] == 1
    assert [e["path"] for e in manifest["shards"]] == [
        "g.1/train/shard-000000.tar",
        "g.1/train/shard-000001.tar",
        "g.1/train/shard-000002.tar",
        "g.1/val/shard-000000.tar",
        "g2/train/shard-000000.tar",
    ]
    assert [e["count"] for e in manifest["shards"]] == [10, 10, 3, 5, 8]
    # write-time shuffle: every multi-sample shard holds both classes
    for entry in manifest["shards"]:
        assert entry["ai"] > 0 and entry["nature"] > 0, entry
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.rglob("*.tmp"))


def test_shards_are_reproducible(tmp_path: Path, shard_set) -> None:
    src, out, manifest = shard_set
    again = write_shards(src, tmp_path / "again", max_count=10, seed=3, progress=False)
    for entry in manifest["shards"]:
        assert (out / entry["path"]).read_bytes() == (tmp_path / "again" / entry["path"]).read_bytes()
    assert again["shards"] == manifest["shards"]


def test_rewrite_removes_stale_shards(shard_set) -> None:
    src, out, _ = shard_set
    manifest = write_shards(src, out, max_count=100, seed=3, progress=False)
    assert len(manifest["shards"]) == 3
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == sorted(
        e["path"] for e in manifest["shards"]
    )


def test_unreadable_image_is_skipped_at_write_time(tmp_path: Path, make_tree) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (2, 2)}})
    (src / "g" / "train" / "ai" / "broken.png").write_bytes(b"not a png")
    manifest = write_shards(src, tmp_path / "out", progress=False)
    assert manifest["skipped"]["unreadable"] == 1
    assert manifest["counts"]["g"]["train"]["total"] == 4


# ---------------------------------------------------------------- load_manifest / select


def test_load_manifest_and_select(shard_set) -> None:
    _, out, _ = shard_set
    m = load_manifest(out)
    assert m.root == out.resolve()
    assert m.generators == ["g.1", "g2"]
    assert load_manifest(out / "manifest.json").shards == m.shards
    for s in m.shards:
        assert Path(s.url).is_absolute() and Path(s.url).is_file()
    assert [s.count for s in m.select("train")] == [10, 10, 3, 8]
    assert [s.count for s in m.select("train", ["g2"])] == [8]
    assert [s.count for s in m.select("val")] == [5]


def test_select_errors_name_what_exists(shard_set) -> None:
    _, out, _ = shard_set
    m = load_manifest(out)
    with pytest.raises(DataError, match="nope.*g.1, g2"):
        m.select("train", ["nope"])
    with pytest.raises(DataError, match="'val'.*g.1/train, g.1/val, g2/train"):
        m.select("val", ["g2"])
    with pytest.raises(DataError, match="'test'"):
        m.select("test")


def test_load_manifest_missing_things(tmp_path: Path, shard_set) -> None:
    with pytest.raises(DataError, match="does not exist.*ds-trainer shard --src.*ds-trainer demo-data"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json.*ds-trainer shard"):
        load_manifest(tmp_path / "empty")
    _, out, manifest = shard_set
    (out / manifest["shards"][0]["path"]).unlink()
    with pytest.raises(DataError, match="missing"):
        load_manifest(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(out)
