"""`ds-trainer shard --layout binary-folders | list`: synthetic trees and lists, read back from the written shards."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ds_trainer import cli
from ds_trainer.data import load_manifest, make_shard_loader, shard_genimage
from ds_trainer.data.layouts import EVAL_SPLIT, scan_layout
from ds_trainer.errors import ConfigError, DataError


def image(path: Path, seed: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def binary_tree(root: Path, spec: dict[str, tuple[int, int]]) -> Path:
    """spec: relative folder holding 0_real/1_fake -> (n_real, n_fake); reals JPEG, fakes PNG."""
    n = 0
    for rel, (n_real, n_fake) in spec.items():
        for cls, count, ext in (("0_real", n_real, "jpg"), ("1_fake", n_fake, "png")):
            for i in range(count):
                image(root / rel / cls / f"{i:03d}.{ext}", n)
                n += 1
    return root


def read_back(out: Path) -> Counter:
    """(generator, split, label) -> count, from every sample's metadata and cls in the tars themselves."""
    found: Counter = Counter()
    for tar_path in sorted(out.rglob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                cls = int(members[name[: -len("json")] + "cls"])
                assert cls == meta["label"]
                # the tar sits under <generator>/<split>/ as its metadata says
                assert tar_path.parent.relative_to(out).parts == (meta["generator"], meta["split"])
                found[(meta["generator"], meta["split"], meta["label"])] += 1
    return found


def shard(src: Path, out: Path, layout: str, **kw):
    return shard_genimage(src, out, layout=layout, max_count=4, workers=1, progress=False, **kw)


def test_binary_folders_generators_categories_merged_and_one_eval_split(tmp_path):
    # ForenSynths/UnivFD test shape without a split folder: generators with categories, one without
    src = binary_tree(tmp_path / "forensynths", {
        "progan/airplane": (3, 2), "progan/bird": (1, 4), "stylegan/car": (2, 2), "dalle": (5, 1),
    })  # fmt: skip
    (src / "progan" / "README.txt").write_text("not an image")
    image(src / "dalle" / "stray.png", 99)  # beside the class folders: not labelled
    report = shard(src, tmp_path / "out", "binary-folders")
    want = {("progan", EVAL_SPLIT, 0): 4, ("progan", EVAL_SPLIT, 1): 6, ("stylegan", EVAL_SPLIT, 0): 2,
            ("stylegan", EVAL_SPLIT, 1): 2, ("dalle", EVAL_SPLIT, 0): 5, ("dalle", EVAL_SPLIT, 1): 1}  # fmt: skip
    assert read_back(tmp_path / "out") == want
    m = report.manifest
    assert m["layout"] == "binary-folders"
    assert m["counts"] == {
        "dalle": {"val": {"ai": 1, "nature": 5, "total": 6}},
        "progan": {"val": {"ai": 6, "nature": 4, "total": 10}},
        "stylegan": {"val": {"ai": 2, "nature": 2, "total": 4}},
    }
    assert m["skipped"]["outside_layout"] == 1 and m["skipped"]["files"][0]["path"] == "dalle/stray.png"
    loaded = load_manifest(tmp_path / "out")
    assert loaded.generators == ["dalle", "progan", "stylegan"] and loaded.splits == ["val"]
    # the loader streams it as data.val_split's default names it
    loader = make_shard_loader(tmp_path / "out", "val", batch_size=4, train=False, num_workers=0, image_size=32)
    labels = [int(v) for batch in loader for v in batch["labels"]]
    assert Counter(labels) == {0: 11, 1: 9}


def test_binary_folders_with_split_folders_and_class_folders_at_the_root(tmp_path):
    # Chameleon-like: 0_real/1_fake right under each split: the generator is the dataset folder's name
    src = binary_tree(tmp_path / "Chameleon", {"train": (3, 2), "test": (2, 3), "val/progan/cat": (1, 1)})
    shard(src, tmp_path / "out", "binary-folders")
    assert read_back(tmp_path / "out") == {
        ("Chameleon", "train", 0): 3, ("Chameleon", "train", 1): 2,
        ("Chameleon", "test", 0): 2, ("Chameleon", "test", 1): 3,
        ("progan", "val", 0): 1, ("progan", "val", 1): 1,
    }  # fmt: skip
    assert load_manifest(tmp_path / "out").splits == ["test", "train", "val"]
    # and without a split folder the root's own name, one split
    flat = binary_tree(tmp_path / "wildrf", {"": (2, 3)})
    shard(flat, tmp_path / "out_flat", "binary-folders")
    assert read_back(tmp_path / "out_flat") == {("wildrf", "val", 0): 2, ("wildrf", "val", 1): 3}


def test_binary_folders_generators_option_and_refusals(tmp_path):
    src = binary_tree(tmp_path / "d", {"a": (1, 1), "b": (2, 2)})
    assert Counter(r.generator for r in scan_layout("binary-folders", src, ["b"]).records) == {"b": 4}
    with pytest.raises(DataError, match=r"generator\(s\) c not found .* available: a, b"):
        scan_layout("binary-folders", src, ["c"])
    image(tmp_path / "genimage" / "sd" / "train" / "ai" / "x.png", 1)
    with pytest.raises(DataError, match=r"no 0_real/ or 1_fake/ folder in .*genimage .* it contains: sd"):
        scan_layout("binary-folders", tmp_path / "genimage")
    with pytest.raises(ConfigError, match=r"--layout folders: unknown layout; use one of genimage, binary-folders"):
        scan_layout("folders", src)
    (tmp_path / "empty" / "g" / "0_real").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        scan_layout("binary-folders", tmp_path / "empty")


def test_list_csv_with_splits_and_label_spellings(tmp_path):
    root = tmp_path / "synthbuster"
    rows = ["path,label,generator,split"]
    spellings = ["0", "1", "real", "fake", "nature", "ai", "REAL", " Fake "]
    for i, lab in enumerate(spellings):
        split = "train" if i < 4 else "test"
        gen = "midjourney" if i % 2 else "dalle3"
        rows.append(f"imgs/{gen}/{i}.png,{lab},{gen},{split}")
        image(root / "imgs" / gen / f"{i}.png", i)
    # a path below another folder, and one going up and back in
    image(root / "more" / "deep" / "x.jpg", 50, "JPEG")
    rows.append("more/deep/../deep/x.jpg,1,dalle3,test")
    (root / "lists").mkdir()
    (root / "lists" / "other.csv").write_text("")  # the list's folder is its root, not the cwd
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    report = shard(root / "list.csv", tmp_path / "out", "list")
    assert read_back(tmp_path / "out") == {
        ("dalle3", "train", 0): 2, ("midjourney", "train", 1): 2,
        ("dalle3", "test", 0): 2, ("midjourney", "test", 1): 2, ("dalle3", "test", 1): 1,
    }  # fmt: skip
    assert report.manifest["layout"] == "list" and report.manifest["source"] == "synthbuster"
    paths = {f["path"] for f in _sidecar_paths(tmp_path / "out")}
    assert "more/deep/x.jpg" in paths and "imgs/dalle3/0.png" in paths  # relative to the list's folder


def _sidecar_paths(out: Path) -> list[dict]:
    metas = []
    for tar_path in out.rglob("shard-*.tar"):
        with tarfile.open(tar_path) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def test_list_jsonl_without_split_goes_to_val_through_the_cli(tmp_path, capsys):
    root = tmp_path / "wild"
    lines = []
    for i in range(6):
        rel = f"{'fake' if i % 2 else 'real'}/{i}.png"
        image(root / rel, i)
        split = {"split": ""} if i == 5 else {}  # an empty split is the default one too
        lines.append(json.dumps({"path": rel, "label": i % 2, "generator": "reddit" if i < 4 else "x", **split}))
    (root / "wild.jsonl").write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out"
    argv = ["shard", "--layout", "list", "--src", str(root / "wild.jsonl"), "--out", str(out), "--workers", "1",
            "--no-progress", "--max-count", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "6 images in" in capsys.readouterr().out
    assert read_back(out) == {("reddit", "val", 0): 2, ("reddit", "val", 1): 2, ("x", "val", 0): 1, ("x", "val", 1): 1}
    # re-running the same command keeps every shard
    assert cli.main(argv) == 0
    assert "kept from an earlier run" in capsys.readouterr().out


@pytest.mark.parametrize("text, suffix, message", [
    ("path,label,generator\nmissing.png,1,g\n", ".csv", r"list\.csv line 2: no file .*missing\.png"),
    ("path,label,generator\na.png,2,g\n", ".csv", r"list\.csv line 2: label '2' is not one of 0/1, real/fake, nature/ai"),
    ('{"path": "a.png", "label": "generated", "generator": "g"}\n', ".jsonl", r"list\.jsonl line 1: label 'generated'"),
    ("path,label\na.png,1\n", ".csv", r"header has no generator column"),
    ("path,label,generator\na.png,1,\n", ".csv", r"line 2: no generator"),
    ("path,label,generator\na.png,1,../up\n", ".csv", r"line 2: generator '\.\./up' is not a name"),
    ("path,label,generator,split\na.png,1,g,a/b\n", ".csv", r"line 2: split 'a/b' is not a name"),
    ("path,label,generator\n../a.png,1,g\n", ".csv", r"line 2: path \.\./a\.png is outside"),
    ("path,label,generator\na.png,1,g\na.png,0,g\n", ".csv", r"line 3: a\.png is listed twice"),
    ('{"path": "a.png"\n', ".jsonl", r"list\.jsonl line 1: not a JSON object"),
    ("a.png 1 g\n", ".txt", r"use a \.csv .* or \.jsonl"),
])  # fmt: skip
def test_list_refusals_name_the_row(tmp_path, text, suffix, message):
    root = tmp_path / "set"
    image(root / "a.png", 0)
    image(tmp_path / "a.png", 1)
    (root / f"list{suffix}").write_text(text)
    with pytest.raises(DataError, match=message) as info:
        scan_layout("list", root / f"list{suffix}")
    assert "\n" not in str(info.value)


def test_list_skips_non_images_and_links_leading_outside(tmp_path):
    root = tmp_path / "set"
    image(root / "a.png", 0)
    image(root / "b.png", 1)
    outside = image(tmp_path / "elsewhere.png", 2)
    (root / "link.png").symlink_to(outside)
    (root / "notes.txt").write_text("x")
    (root / "l.csv").write_text("path,label,generator\na.png,0,g\nb.png,1,g\nlink.png,1,g\nnotes.txt,0,g\n")
    scan = scan_layout("list", root / "l.csv")
    assert [r.path.name for r in scan.records] == ["a.png", "b.png"]
    assert {s["path"]: s["kind"] for s in scan.skipped} == {"link.png": "symlink_outside_src", "notes.txt": "non_image"}
    followed = scan_layout("list", root / "l.csv", follow_symlinks=True)
    assert sorted(r.path.name for r in followed.records) == ["a.png", "b.png", "link.png"]
