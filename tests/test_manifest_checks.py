"""A manifest is input, not trust: shard paths stay under the shard root, counts are possible and agree
with the sidecars, no shard is listed twice, and a tar that disagrees with its count is read in full,
each real sample scored exactly once, with one warning naming it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ds_trainer.data import make_shard_loader, shard_genimage
from ds_trainer.data.manifest import load_manifest
from ds_trainer.data.manifest_checks import MAX_SHARD_SAMPLES, TAR_BLOCK
from ds_trainer.errors import DataError
from ds_trainer.evaluation import evaluate

SIZE = 16
VAL = 7  # the val split: one shard of 4 and one of 3 (max_count 4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, make_tree) -> Path:
    base = tmp_path_factory.mktemp("manifest_checks")
    src = make_tree(base / "gi", {"g": {"train": (4, 4), "val": (4, 3)}}, size=(20, 16))
    shard_genimage(src, base / "shards", max_count=4, workers=1, progress=False)
    return base / "shards"


@pytest.fixture
def shards(tmp_path: Path, pristine: Path) -> Path:
    root = tmp_path / "shards"
    shutil.copytree(pristine, root)
    return root


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def _edit(root: Path, index: int | None = None, **entry: Any) -> dict[str, Any]:
    """Change shard entry `index` (None: none) and write the manifest back; returns the manifest."""
    manifest = _manifest(root)
    if index is not None:
        manifest["shards"][index].update(entry)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _val_entries(manifest: dict[str, Any]) -> list[int]:
    return [i for i, e in enumerate(manifest["shards"]) if e["split"] == "val"]


def _refused(root: Path, *words: str) -> str:
    with pytest.raises(DataError) as err:
        load_manifest(root)
    message = str(err.value)
    assert "\n" not in message
    assert str(root / "manifest.json") in message
    for word in words:
        assert word in message, message
    return message


# ------------------------------------------------------------------ family 3: paths stay under the root


def _outside_tar(shards: Path) -> Path:
    """A real, valid shard outside the shard root: what a hostile manifest would make the loader read."""
    outside = shards.parent / "outside"
    outside.mkdir(exist_ok=True)
    first = _manifest(shards)["shards"][0]["path"]
    shutil.copy(shards / first, outside / "x.tar")
    return outside / "x.tar"


@pytest.mark.unit
@pytest.mark.parametrize(
    "how", ["dotdot", "nested-dotdot", "absolute", "absolute-inside", "file-link", "folder-link", "dangling"]
)
def test_a_shard_path_leading_outside_the_root_is_refused(shards: Path, how: str) -> None:
    target = _outside_tar(shards)
    if how == "dotdot":
        path = "../outside/x.tar"
    elif how == "nested-dotdot":
        path = "g/val/../../../outside/x.tar"
    elif how == "absolute":
        path = str(target)
    elif how == "absolute-inside":  # names a shard inside, but a manifest's paths are relative to it
        path = str(shards / _manifest(shards)["shards"][0]["path"])
    elif how == "file-link":  # a link inside the root to a tar outside it: refused too (documented)
        os.symlink(target, shards / "g" / "val" / "link.tar")
        path = "g/val/link.tar"
    elif how == "folder-link":
        os.symlink(target.parent, shards / "g" / "elsewhere")
        path = "g/elsewhere/x.tar"
    else:  # a link to where a tar could appear later
        os.symlink(shards.parent / "later" / "x.tar", shards / "g" / "later.tar")
        path = "g/later.tar"
    _edit(shards, 0, path=path)
    message = _refused(shards, "shards[0]", path, "stays inside")
    assert ("absolute path" in message) == how.startswith("absolute")


@pytest.mark.unit
@pytest.mark.parametrize("path", ["", ".", "g/val", None, 7])
def test_a_shard_path_that_names_no_file_inside_is_refused(shards: Path, path: Any) -> None:
    _edit(shards, 1, path=path)
    with pytest.raises(DataError, match=r"shards\[1\]"):
        load_manifest(shards)


@pytest.mark.unit
def test_links_that_stay_inside_and_a_linked_root_are_read(shards: Path, tmp_path: Path) -> None:
    manifest = _manifest(shards)
    i = _val_entries(manifest)[0]
    real = manifest["shards"][i]["path"]
    os.rename(shards / real, shards / "g" / "moved.tar")
    os.symlink("../moved.tar", shards / real)  # a link inside the root, to a file inside it
    link_root = tmp_path / "linked_root"
    os.symlink(shards, link_root)  # the whole shard folder linked from elsewhere: the documented way
    for root in (shards, link_root):
        loaded = load_manifest(root)
        assert loaded.shards[i].url == str((shards / "g" / "moved.tar").resolve())
        keys = [k for b in make_shard_loader(root, "val", batch_size=4, train=False, num_workers=0,
                                             image_size=SIZE) for k in b["key"]]  # fmt: skip
        assert len(keys) == len(set(keys)) == VAL


# ------------------------------------------------------------------ family 4: counts and uniqueness


@pytest.mark.unit
@pytest.mark.parametrize(
    "change, words",
    [
        ({"count": -1, "ai": -1, "nature": 0}, ["count -1", "whole number"]),
        ({"count": "4"}, ['count "4"', "whole number"]),
        ({"count": 4.0}, ["count 4.0"]),
        ({"count": True}, ["count true"]),
        ({"ai": -3}, ["ai -3"]),
        ({"count": 3, "ai": 3, "nature": 3}, ["ai 3 + nature 3 is not its count 3"]),
        ({"bytes": -5}, ["bytes -5"]),
    ],
)
def test_counts_that_are_no_whole_numbers_are_refused(shards: Path, change: dict, words: list[str]) -> None:
    _edit(shards, 0, **change)
    _refused(shards, "shards[0]", *words)


@pytest.mark.unit
def test_a_count_no_tar_of_its_size_can_hold_is_refused(shards: Path) -> None:
    manifest = _manifest(shards)
    del manifest["max_count"]  # else that is the tighter bound
    (shards / "manifest.json").write_text(json.dumps(manifest))
    entry = manifest["shards"][0]
    big = 10**12
    _edit(shards, 0, count=big, ai=big, nature=0)
    _refused(shards, "shards[0]", f"count {big}", f"what a tar of {entry['bytes']} bytes can hold")

    # without the recorded size, the tar's size on disk bounds it
    manifest["shards"][0].pop("bytes")
    (shards / "manifest.json").write_text(json.dumps(manifest))
    _edit(shards, 0, count=big, ai=big, nature=0)
    size = (shards / entry["path"]).stat().st_size
    _refused(shards, f"what a tar of {size} bytes can hold ({size // TAR_BLOCK})")


@pytest.mark.unit
def test_a_missing_shard_cannot_claim_more_than_the_set_allows(shards: Path) -> None:
    manifest = _manifest(shards)
    entry = manifest["shards"][0]
    (shards / entry["path"]).unlink()
    (shards / entry["path"]).with_suffix(".json").unlink()
    del entry["bytes"]
    entry.update(count=5, ai=5, nature=0)  # the manifest's max_count is 4
    (shards / "manifest.json").write_text(json.dumps(manifest))
    _refused(shards, "count 5 is more than the manifest's max_count (4)")
    del manifest["max_count"]
    entry.update(count=MAX_SHARD_SAMPLES + 1, ai=MAX_SHARD_SAMPLES + 1)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    _refused(shards, f"the most one shard may hold ({MAX_SHARD_SAMPLES})")


@pytest.mark.unit
@pytest.mark.parametrize("key, delta", [("count", -1), ("ai", -1), ("bytes", 512)])
def test_counts_that_disagree_with_the_sidecar_are_refused(shards: Path, key: str, delta: int) -> None:
    entry = _manifest(shards)["shards"][0]
    change = {key: entry[key] + delta}
    if key == "count":
        change["ai"] = entry["ai"] - 1  # keep ai + nature = count, so only the sidecar can tell
    if key == "ai":
        change["nature"] = entry["nature"] + 1
    _edit(shards, 0, **change)
    sidecar = Path(entry["path"]).with_suffix(".json").name
    _refused(shards, "shards[0]", f"disagrees with its sidecar {sidecar}")


@pytest.mark.unit
@pytest.mark.parametrize("spelling", ["same", "dot-slash", "through-dotdot", "through-link"])
def test_a_shard_listed_twice_is_refused(shards: Path, spelling: str) -> None:
    manifest = _manifest(shards)
    first = manifest["shards"][0]
    again = dict(first)
    if spelling == "dot-slash":
        again["path"] = "./" + first["path"]
    elif spelling == "through-dotdot":
        again["path"] = f"g/../{first['path']}"
    elif spelling == "through-link":
        os.symlink(Path(first["path"]).name, shards / Path(first["path"]).with_name("alias.tar"))
        again["path"] = str(Path(first["path"]).with_name("alias.tar"))
    manifest["shards"].append(again)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    n = len(manifest["shards"]) - 1
    _refused(shards, f"shards[{n}]", "is the shard of shards[0] again", "scored twice")


# ------------------------------------------------------------------ family 4: the tar disagrees with its count


class _Scorer(torch.nn.Module):
    """Stands in for the DeepSpeed engine: what evaluate() needs is a device and logits per image."""

    device = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1)


def _evaluate(loader) -> dict[str, Any]:
    result = evaluate(_Scorer(), loader, epoch=0, zero_stage=0, dtype=torch.float32, loss_fn=F.cross_entropy,
                      image_size=SIZE, max_bad_fraction=1.0)  # fmt: skip
    return {**result.row, "keys": result.predictions["key"]}


def _undercount(shards: Path, by: int) -> tuple[int, str]:
    """The first val shard's count lowered by `by`, its sidecar gone (else the load refuses): (index, url)."""
    manifest = _manifest(shards)
    i = _val_entries(manifest)[0]
    entry = manifest["shards"][i]
    (shards / entry["path"]).with_suffix(".json").unlink()
    entry.update(count=entry["count"] - by, ai=entry["ai"] - min(by, entry["ai"]))
    entry["nature"] = entry["count"] - entry["ai"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return i, str((shards / entry["path"]).resolve())


@pytest.mark.unit
@pytest.mark.parametrize("by", [1, 3])
def test_a_tar_holding_more_than_its_count_is_scored_in_full_once(shards: Path, caplog, by: int) -> None:
    _, url = _undercount(shards, by)
    loader = make_shard_loader(shards, "val", batch_size=2, train=False, num_workers=0, image_size=SIZE)
    caplog.set_level(logging.WARNING, logger="ds_trainer.data.pipeline")
    for epoch in range(2):
        row = _evaluate(loader)
        assert row["val_samples"] == VAL and len(set(row["keys"])) == VAL, epoch
        assert row["val_bad_samples"] == 0
    warned = [r.getMessage() for r in caplog.records if "more than the" in r.getMessage()]
    assert len(warned) == 1 and url in warned[0] and f"more than the {4 - by} its manifest counts" in warned[0]


@pytest.mark.unit
@pytest.mark.parametrize("by", [2, 4])  # 4: the shard is counted 0
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_real_sample_goes_to_exactly_one_rank(shards: Path, world_size: int, by: int) -> None:
    # one val shard undercounted; with 3 or 4 ranks (more ranks than val shards) samples are strided
    _undercount(shards, by)
    keys: list[str] = []
    for rank in range(world_size):
        loader = make_shard_loader(shards, "val", batch_size=2, train=False, rank=rank, world_size=world_size,
                                   num_workers=0, image_size=SIZE)  # fmt: skip
        keys += _evaluate(loader)["keys"] or []
    assert len(keys) == len(set(keys)) == VAL


@pytest.mark.unit
def test_a_tar_holding_fewer_than_its_count_counts_the_rest_as_bad_once(shards: Path, caplog) -> None:
    # a count above the tar's content but within what a tar of its size can hold: the placeholders
    # are bounded by the file, and counted as bad, never scored
    manifest = _manifest(shards)
    i = _val_entries(manifest)[1]
    entry = manifest["shards"][i]
    (shards / entry["path"]).with_suffix(".json").unlink()
    real = entry["count"]
    entry.update(count=real + 5, ai=entry["ai"] + 5)
    del manifest["max_count"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    caplog.set_level(logging.WARNING, logger="ds_trainer.data.pipeline")
    loader = make_shard_loader(shards, "val", batch_size=2, train=False, num_workers=0, image_size=SIZE)
    for _ in range(2):
        row = _evaluate(loader)
        assert (row["val_samples"], row["val_bad_samples"]) == (VAL, 5)
    warned = [r.getMessage() for r in caplog.records if "samples its manifest counts" in r.getMessage()]
    assert len(warned) == 1 and f"gave {real} of the {real + 5}" in warned[0]


@pytest.mark.unit
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_ranks_still_yield_equal_batches_when_a_tar_holds_more(shards: Path, world_size: int) -> None:
    manifest = _manifest(shards)
    entry = manifest["shards"][0]  # a train shard of 4
    (shards / entry["path"]).with_suffix(".json").unlink()
    entry.update(count=1, ai=min(1, entry["ai"]), nature=1 - min(1, entry["ai"]))
    (shards / "manifest.json").write_text(json.dumps(manifest))
    lengths = set()
    for rank in range(world_size):
        loader = make_shard_loader(shards, "train", batch_size=1, train=True, rank=rank, world_size=world_size,
                                   num_workers=0, image_size=SIZE)  # fmt: skip
        for epoch in range(2):
            loader.set_epoch(epoch)
            lengths.add((len(loader), len(list(loader))))
    assert len(lengths) == 1 and len({n for pair in lengths for n in pair}) == 1


class _CountingScorer(_Scorer):
    """Counts its forward passes: under ZeRO-3 each is a collective, so every rank must make as many."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


def _rank_eval(rank: int, world: int, port: int, shards: Path, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = make_shard_loader(shards, "val", batch_size=1, train=False, rank=rank, world_size=world,
                                   num_workers=0, image_size=SIZE, pin_memory=False)  # fmt: skip
        result = evaluate(_CountingScorer(), loader, epoch=0, zero_stage=3, dtype=torch.float32,
                          loss_fn=F.cross_entropy, image_size=SIZE, max_bad_fraction=1.0)  # fmt: skip
        (out / f"rank{rank}.json").write_text(
            json.dumps({"len": len(loader), "calls": _CountingScorer.calls, "keys": result.predictions["key"]})
        )
    finally:
        dist.destroy_process_group()


def test_zero3_ranks_stay_in_step_while_reading_past_len(shards: Path, tmp_path: Path) -> None:
    # rank 0 reads the undercounted shard (4 real, counted 1): it has batches past its len, which the
    # other rank must join with dummy forwards, or a real ZeRO-3 job would hang in the all-gather
    import socket

    import torch.multiprocessing as mp

    _undercount(shards, 3)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_eval, args=(2, port, shards, tmp_path), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["calls"] == ranks[1]["calls"] >= VAL // 2 + 1
    assert sum(r["len"] for r in ranks) < VAL  # the loaders announced fewer batches than they gave
    keys = ranks[0]["keys"]  # gathered from both ranks
    assert len(keys) == len(set(keys)) == VAL
