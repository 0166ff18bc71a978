"""Only regular files are opened: a FIFO, a device or a folder named x.png never blocks or floods
`predict`, `shard`, GenImageDataset or the shard loader; it is named and passed over. Every test runs
under an alarm, so a reader that blocks fails the test instead of hanging the suite."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fail_after
from test_image_limits import TinyDetector, good_image

from ds_trainer import cli
from ds_trainer.data import GenImageDataset, make_shard_loader, shard_genimage
from ds_trainer.data import shards as shards_module
from ds_trainer.data.genimage import BadSample
from ds_trainer.data.manifest import load_manifest
from ds_trainer.data.regular_file import NotRegularFile, open_regular
from ds_trainer.errors import DataError
from ds_trainer.export import predict_paths

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    with fail_after(60, "a FIFO or device was opened"):
        yield


def odd_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, what the refusal says it is): a FIFO, a folder, and links to a device and a FIFO."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.png")
    (folder / "folder.png").mkdir()
    os.symlink("/dev/zero", folder / "zero.png")  # reading it would never end
    os.symlink(folder / "fifo.png", folder / "to_fifo.jpg")
    return {
        "fifo.png": (folder / "fifo.png", "a FIFO (named pipe)"),
        "folder.png": (folder / "folder.png", "a directory"),
        "zero.png": (folder / "zero.png", "a character device"),
        "to_fifo.jpg": (folder / "to_fifo.jpg", "a FIFO (named pipe)"),
    }


@pytest.mark.unit
def test_open_regular_refuses_each_kind_without_reading(tmp_path: Path) -> None:
    for path, kind in odd_files(tmp_path).values():
        with pytest.raises(NotRegularFile, match=re.escape(kind)):
            open_regular(path)
    with open_regular(good_image(tmp_path / "ok.png")) as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.unit
def test_predict_names_each_odd_file_and_scores_the_rest(tmp_path: Path) -> None:
    odd = odd_files(tmp_path / "odd")
    good = good_image(tmp_path / "ok.png")
    outside = good_image(tmp_path / "elsewhere" / "real.png")
    os.symlink(outside, tmp_path / "odd" / "link.png")  # a link to an image outside the folder: followed
    paths = [good, *(p for p, _ in odd.values()), tmp_path / "odd" / "link.png"]
    results = predict_paths(TinyDetector(), paths)
    assert results[0].p_ai is not None and results[-1].p_ai is not None
    assert results[-1].p_ai == pytest.approx(results[0].p_ai)  # the same picture
    for r, (path, kind) in zip(results[1:-1], odd.values()):
        assert r.p_ai is None and str(path) in r.error and kind in r.error


def test_predict_cli_with_a_fifo_exits_3_and_prints_the_good_ones(tmp_path: Path, monkeypatch, capsys) -> None:
    from ds_trainer import export

    monkeypatch.setattr(export, "load_exported", lambda _model: TinyDetector())
    os.mkfifo(tmp_path / "x.png")
    good = good_image(tmp_path / "ok.png")
    code = cli.main(["predict", "--model", str(tmp_path / "m"), str(tmp_path / "x.png"), str(good), "--json"])
    out, err = capsys.readouterr()
    assert code == 3
    rows = json.loads(out)
    assert rows[1]["p_ai"] is not None and rows[0]["p_ai"] is None and "FIFO" in rows[0]["error"]
    assert "1 of 2 images unreadable" in err and "Traceback" not in err


@pytest.mark.parametrize("workers", [1, 2])
def test_shard_passes_over_odd_files_and_lists_them(tmp_path: Path, make_tree, workers: int) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (2, 2)}})
    odd = odd_files(src / "g" / "train" / "ai")
    manifest = shard_genimage(src, tmp_path / "out", workers=workers, progress=False, follow_symlinks=True).manifest
    assert manifest["counts"]["g"]["train"] == {"ai": 2, "nature": 2, "total": 4}
    skipped = {Path(f["path"]).name: f for f in manifest["skipped"]["files"]}
    for name, (_, kind) in odd.items():
        if name == "folder.png":  # a folder is searched like any folder, never opened as an image
            continue
        assert skipped[name]["kind"] == "unreadable" and kind in skipped[name]["reason"], skipped[name]


def test_shard_cli_with_a_fifo_finishes(tmp_path: Path, make_tree, capsys) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (1, 1)}})
    os.mkfifo(src / "g" / "train" / "ai" / "x.png")
    out = tmp_path / "out"
    assert cli.main(["shard", "--src", str(src), "--out", str(out), "--no-progress", "--workers", "2"]) == 0
    assert "1 unreadable" in capsys.readouterr().out


def test_a_file_replaced_by_a_fifo_after_the_scan_is_not_read(tmp_path: Path, make_tree, monkeypatch) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (2, 2)}})
    victim = src / "g" / "train" / "nature" / "nature_000.jpg"
    real_plan = shards_module.plan_shards

    def swap_then_plan(*args: Any, **kwargs: Any):
        victim.unlink()
        os.mkfifo(victim)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(shards_module, "plan_shards", swap_then_plan)
    manifest = shard_genimage(src, tmp_path / "out", workers=1, progress=False).manifest
    assert manifest["counts"]["g"]["train"] == {"ai": 2, "nature": 1, "total": 3}
    (entry,) = [f for f in manifest["skipped"]["files"] if f["path"].endswith("nature_000.jpg")]
    assert "FIFO" in entry["reason"]


@pytest.mark.unit
def test_genimage_dataset_gives_a_fifo_back_as_a_bad_sample(tmp_path: Path, make_tree) -> None:
    root = make_tree(tmp_path / "gi", {"g": {"train": (2, 1)}})
    os.mkfifo(root / "g" / "train" / "ai" / "x.png")
    ds = GenImageDataset(root, split="train", image_size=16)  # the scan passes over it
    assert len(ds) == 3
    victim = ds.records[0].path  # replaced after the scan
    victim.unlink()
    os.mkfifo(victim)
    item = ds[0]
    assert isinstance(item, BadSample) and "FIFO" in item.reason
    assert not isinstance(ds[1], BadSample)


@pytest.fixture
def shard_set(tmp_path: Path, make_tree) -> Path:
    src = make_tree(tmp_path / "gi", {"g": {"val": (3, 3)}}, size=(20, 16))
    shard_genimage(src, tmp_path / "shards", max_count=3, workers=1, progress=False)
    return tmp_path / "shards"


def _first_val(root: Path) -> Path:
    return root / json.loads((root / "manifest.json").read_text())["shards"][0]["path"]


@pytest.mark.unit
def test_a_shard_that_is_a_fifo_is_refused_when_the_manifest_is_read(shard_set: Path) -> None:
    path = _first_val(shard_set)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(DataError, match=r"shards\[0\] path .* is a FIFO \(named pipe\), not a tar file"):
        load_manifest(shard_set)


@pytest.mark.unit
def test_a_shard_replaced_by_a_fifo_while_loading_counts_as_bad(shard_set: Path) -> None:
    loader = make_shard_loader(shard_set, "val", batch_size=2, train=False, num_workers=0, image_size=16)
    path = _first_val(shard_set)
    shutil.move(path, path.with_suffix(".bak"))
    os.mkfifo(path)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 3 and sum(b["bad_samples"] for b in batches) == 3
