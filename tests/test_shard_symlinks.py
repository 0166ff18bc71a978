"""`ds-trainer shard` and symbolic links: links inside --src are followed, links leading outside it are
skipped and listed unless --follow-symlinks, link loops end, and the manifest holds no absolute paths."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import fail_after
from PIL import Image

from ds_trainer import cli
from ds_trainer.data import shards

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")

SPEC = {"g": {"train": (2, 2), "val": (1, 1)}}  # the regular files of the tree: 6 images

# every link of the tree, relative to --src, and what a run without --follow-symlinks makes of it
INTERNAL = {
    "g/train/nature/linked.jpg": "file link into pool/ (inside --src): 1 image",
    "g/train/ai/linked_dir": "folder link into pool/ (inside --src): 2 images",
    "g/train/ai/cyc": "folder link into pool/cyc1, whose links go round cyc1 -> cyc2 -> cyc1",
}
OUTSIDE = [  # sorted by path, as in the manifest
    "ext_gen",  # a whole generator folder that is a link to elsewhere/
    "g/train/ai/leak.png",  # absolute file link
    "g/val/ai/chain.png",  # inside link to a link that leads outside: judged by where it ends
    "g/val/ai/up.png",  # relative file link climbing out with ..
    "g/val/nature/leak_dir",  # folder link
]
LOOPS = [
    "g/train/ai/cyc/to2/to1",  # back to a folder above it
    "g/train/ai/loop",  # -> .. (its own parent's parent)
    "g/val/ai/self.png",  # a link to itself
]
COUNTS = {  # without --follow-symlinks
    "g": {"train": {"ai": 4, "nature": 3, "total": 7}, "val": {"ai": 1, "nature": 1, "total": 2}},
}
COUNTS_FOLLOWED = {
    "ext_gen": {"train": {"ai": 1, "nature": 1, "total": 2}},
    "g": {"train": {"ai": 5, "nature": 3, "total": 8}, "val": {"ai": 3, "nature": 4, "total": 7}},
}


def _image(path: Path, seed: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _link(path: str | Path, target: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def _symlink_tree(base: Path, make_tree) -> tuple[Path, Path]:
    """<base>/GenImage (the --src) with every kind of link, and <base>/elsewhere, which it must not leak."""
    src = make_tree(base / "GenImage", SPEC, size=(16, 16))
    out = base / "elsewhere"
    _image(out / "secret.png", 100, "PNG")
    for i in range(3):
        _image(out / "photos" / f"p{i}.jpg", 110 + i, "JPEG")
    _image(out / "gen2" / "train" / "ai" / "f.png", 130, "PNG")  # a generator folder kept on another disk
    _image(out / "gen2" / "train" / "nature" / "r.jpg", 131, "JPEG")

    # pool/: inside --src but no train/ or val/ below it, so not a generator; reached only through links
    pool = src / "pool"
    _image(pool / "real.jpg", 120, "JPEG")
    _image(pool / "ai_imgs" / "a0.png", 121, "PNG")
    _image(pool / "ai_imgs" / "a1.png", 122, "PNG")
    (pool / "cyc1").mkdir()
    (pool / "cyc2").mkdir()
    _link(pool / "cyc1" / "to2", "../cyc2")
    _link(pool / "cyc2" / "to1", "../cyc1")
    _link(pool / "out_link.png", out / "secret.png")

    _link(src / "g/train/nature/linked.jpg", "../../../pool/real.jpg")
    _link(src / "g/train/ai/linked_dir", "../../../pool/ai_imgs")
    _link(src / "g/train/ai/cyc", "../../../pool/cyc1")
    _link(src / "ext_gen", out / "gen2")
    _link(src / "g/train/ai/leak.png", out / "secret.png")
    _link(src / "g/val/ai/chain.png", "../../../pool/out_link.png")
    _link(src / "g/val/ai/up.png", "../../../../elsewhere/secret.png")
    _link(src / "g/val/nature/leak_dir", out / "photos")
    _link(src / "g/train/ai/loop", "..")
    _link(src / "g/val/ai/self.png", "self.png")
    return src, out


@pytest.fixture
def tree(tmp_path: Path, make_tree) -> tuple[Path, Path]:
    return _symlink_tree(tmp_path, make_tree)


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    with fail_after(60, "sharding did not finish (a symlink loop?)"):
        yield


def _shard(src: Path, out: Path, *extra: str) -> dict[str, Any]:
    args = ["shard", "--src", str(src), "--out", str(out), "--no-progress", "--workers", "1", *extra]
    assert cli.main(args) == 0
    return json.loads((out / "manifest.json").read_text())


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _assert_no_absolute_paths(out: Path, base: Path) -> None:
    """Neither the manifest nor any sidecar names a file by an absolute path (or mentions the test's tmp dir)."""
    files = [out / "manifest.json", *out.rglob("shard-*.json")]
    assert len(files) > 1
    for path in files:
        for s in _strings(json.loads(path.read_text())):
            assert not os.path.isabs(s) and str(base) not in s and not s.startswith(".."), (path, s)


def _tar_paths(out: Path, manifest: dict[str, Any]) -> list[str]:
    """The source path of every sample in the listed shards (from each sample's json)."""
    paths = []
    for entry in manifest["shards"]:
        assert not os.path.isabs(entry["path"]) and (out / entry["path"]).is_file()
        with tarfile.open(out / entry["path"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    paths.append(json.loads(tar.extractfile(member).read())["path"])
    return sorted(paths)


def _shard_bytes(out: Path, manifest: dict[str, Any]) -> bytes:
    return b"".join((out / e["path"]).read_bytes() for e in manifest["shards"])


def _skipped(manifest: dict[str, Any], kind: str) -> list[str]:
    return [f["path"] for f in manifest["skipped"]["files"] if f["kind"] == kind]


def test_links_leading_outside_are_skipped_listed_and_logged_once(tree, tmp_path: Path, caplog, capsys) -> None:
    src, elsewhere = tree
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="ds_trainer.data.shards"):
        manifest = _shard(src, out)

    assert manifest["counts"] == COUNTS
    assert sum(e["count"] for e in manifest["shards"]) == 9
    assert manifest["follow_symlinks"] is False
    assert manifest["source"] == "GenImage"
    assert _skipped(manifest, "symlink_outside_src") == OUTSIDE
    assert _skipped(manifest, "symlink_loop") == LOOPS
    assert [f["path"] for f in manifest["skipped"]["files"]] == sorted(OUTSIDE + LOOPS)
    assert (manifest["skipped"]["symlink_outside_src"], manifest["skipped"]["symlink_loop"]) == (5, 3)
    assert (manifest["skipped"]["unreadable"], manifest["skipped"]["non_image"]) == (0, 0)
    for f in manifest["skipped"]["files"]:
        assert "--follow-symlinks" in f["reason"] if f["kind"] == "symlink_outside_src" else "loop" in f["reason"]

    # links inside --src are read, under the link's own path; nothing from elsewhere/ is
    samples = _tar_paths(out, manifest)
    assert [p for p in samples if "linked" in p] == [
        "g/train/ai/linked_dir/a0.png", "g/train/ai/linked_dir/a1.png", "g/train/nature/linked.jpg",
    ]  # fmt: skip
    assert len(samples) == 9 and not any(p in samples for p in OUTSIDE)
    stored = _shard_bytes(out, manifest)
    assert (src / "pool" / "real.jpg").read_bytes() in stored
    for secret in [elsewhere / "secret.png", *(elsewhere / "photos").iterdir(), *(elsewhere / "gen2").rglob("*.*")]:
        assert secret.read_bytes() not in stored, secret

    # one warning naming the count and the first paths, not one line per link
    warnings = [r.getMessage() for r in caplog.records if "outside" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"not following 5 symbolic link(s) that lead outside {src}: ")
    assert ", ".join(OUTSIDE) in warnings[0] and "--follow-symlinks" in warnings[0]
    line = capsys.readouterr().out
    assert "skipped: 0 unreadable, 0 non-image, 0 outside layout, 5 symlink(s) outside --src, 3 symlink loop(s)" in line

    _assert_no_absolute_paths(out, tmp_path)


def test_follow_symlinks_reads_links_leading_outside(tree, tmp_path: Path) -> None:
    src, elsewhere = tree
    out = tmp_path / "out"
    manifest = _shard(src, out, "--follow-symlinks")

    assert manifest["counts"] == COUNTS_FOLLOWED
    assert sum(e["count"] for e in manifest["shards"]) == 17
    assert manifest["follow_symlinks"] is True
    assert manifest["skipped"]["symlink_outside_src"] == 0 and _skipped(manifest, "symlink_outside_src") == []
    assert _skipped(manifest, "symlink_loop") == LOOPS  # loops still end
    assert [f["path"] for f in manifest["skipped"]["files"]] == LOOPS
    samples = _tar_paths(out, manifest)
    for link in ("g/train/ai/leak.png", "g/val/ai/chain.png", "g/val/ai/up.png"):
        assert link in samples
    assert sum(p.startswith("g/val/nature/leak_dir/") for p in samples) == 3
    assert sum(p.startswith("ext_gen/train/") for p in samples) == 2
    assert (elsewhere / "secret.png").read_bytes() in _shard_bytes(out, manifest)
    _assert_no_absolute_paths(out, tmp_path)


def test_rerun_without_the_flag_drops_what_it_read_from_outside(tree, tmp_path: Path) -> None:
    src, elsewhere = tree
    out = tmp_path / "out"
    assert _shard(src, out, "--follow-symlinks")["counts"] == COUNTS_FOLLOWED
    manifest = _shard(src, out)  # same --out: shards planned from outside files must not be kept
    assert manifest["counts"] == COUNTS
    assert (elsewhere / "secret.png").read_bytes() not in _shard_bytes(out, manifest)
    assert _shard(src, out, "--follow-symlinks")["counts"] == COUNTS_FOLLOWED


def test_a_file_replaced_by_an_outside_link_after_the_scan_is_not_read(tree, tmp_path: Path, monkeypatch) -> None:
    src, elsewhere = tree
    victim = src / "g" / "train" / "nature" / "nature_000.jpg"
    real_plan = shards.plan_shards

    def swap_then_plan(*args, **kwargs):
        victim.unlink()
        victim.symlink_to(elsewhere / "photos" / "p0.jpg")
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(shards, "plan_shards", swap_then_plan)
    out = tmp_path / "out"
    manifest = _shard(src, out)
    assert manifest["counts"]["g"]["train"] == {"ai": 4, "nature": 2, "total": 6}
    assert "g/train/nature/nature_000.jpg" in _skipped(manifest, "symlink_outside_src")
    assert (elsewhere / "photos" / "p0.jpg").read_bytes() not in _shard_bytes(out, manifest)
    _assert_no_absolute_paths(out, tmp_path)


def test_only_outside_links_is_an_error_that_names_the_flag(tmp_path: Path, make_tree, capsys) -> None:
    real = make_tree(tmp_path / "disk2", {"ADM": {"train": (1, 1)}}, size=(16, 16))
    src = tmp_path / "GenImage"
    src.mkdir()
    _link(src / "ADM", real / "ADM")
    args = ["shard", "--src", str(src), "--out", str(tmp_path / "out"), "--no-progress", "--workers", "1"]
    assert cli.main(args) == 3
    err = capsys.readouterr().err
    assert "no generator folders" in err and "not followed: ADM" in err and "--follow-symlinks" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert cli.main([*args, "--follow-symlinks"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"ADM": {"train": {"ai": 1, "nature": 1, "total": 2}}}
    assert manifest["source"] == "GenImage"
    _assert_no_absolute_paths(tmp_path / "out", tmp_path)


def test_manifest_paths_are_relative_without_any_link(tmp_path: Path, make_tree, monkeypatch) -> None:
    """The plain case too: shard paths relative to --out, skipped files relative to --src, source a name."""
    src = make_tree(tmp_path / "data" / "GenImage", {"g": {"train": (2, 2)}}, size=(16, 16))
    (src / "g" / "train" / "ai" / "notes.txt").write_text("junk")
    (src / "g" / "train" / "ai" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    # --src given relative to the working directory, and through a `..`
    monkeypatch.chdir(tmp_path / "data")
    manifest = _shard(Path("..") / "data" / "GenImage", out)
    assert manifest["source"] == "GenImage"
    assert [e["path"] for e in manifest["shards"]] == ["g/train/shard-000000.tar"]
    assert [(f["path"], f["kind"]) for f in manifest["skipped"]["files"]] == [
        ("g/train/ai/broken.png", "unreadable"), ("g/train/ai/notes.txt", "non_image"),
    ]  # fmt: skip
    _assert_no_absolute_paths(out, tmp_path)
