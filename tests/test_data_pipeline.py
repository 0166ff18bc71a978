"""Streaming loader: equal train lengths on every rank, exact eval coverage and lengths.

Ranks are simulated in one process: a loader built with rank=r, world_size=W reads exactly
what rank r of a W-rank job reads, since the split depends only on the manifest.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from ds_trainer.data import ShardLoader, make_shard_loader, shard_genimage
from ds_trainer.data.manifest import ShardInfo
from ds_trainer.data.rank_plan import plan_rank
from ds_trainer.errors import DataError

SIZE = 16  # tiny images keep the suite fast; the maths does not depend on it


def _loader(shards: Path, split: str, **kw) -> ShardLoader:
    kw.setdefault("image_size", SIZE)
    return make_shard_loader(shards, split, **kw)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, make_tree) -> Path:
    """train shards of 10, 3 and 2 samples (uneven); val shards of 7 and 4."""
    root = tmp_path_factory.mktemp("uneven")
    spec = {"a": {"train": (7, 6), "val": (4, 3)}, "b": {"train": (1, 1), "val": (2, 2)}}
    src = make_tree(root / "gi", spec, size=(20, 16))
    manifest = shard_genimage(src, root / "shards", max_count=10, progress=False).manifest
    assert sorted(e["count"] for e in manifest["shards"] if e["split"] == "train") == [2, 3, 10]
    return root / "shards"


@pytest.fixture(scope="module")
def single(tmp_path_factory, make_tree) -> Path:
    """one train shard of 9 samples and one val shard of 5: fewer shards than ranks."""
    root = tmp_path_factory.mktemp("single")
    src = make_tree(root / "gi", {"a": {"train": (5, 4), "val": (3, 2)}}, size=(20, 16))
    shard_genimage(src, root / "shards", max_count=100, progress=False)
    return root / "shards"


def _epoch(loader: ShardLoader) -> list[dict]:
    return list(loader)


# ---------------------------------------------------------------- pure shard maths


def _shards(counts: list[int]) -> list[ShardInfo]:
    return [ShardInfo(f"/x/{i}.tar", f"{i}.tar", "g", "val", c, c, 0) for i, c in enumerate(counts)]


@pytest.mark.parametrize("trial", range(30))
def test_plan_partitions_every_sample_exactly_once(trial: int) -> None:
    rng = random.Random(trial)
    counts = [rng.randint(1, 12) for _ in range(rng.randint(1, 7))]
    world_size = rng.randint(1, 5)
    num_workers = rng.randint(0, 3)
    seen: list[int] = []
    for rank in range(world_size):
        plan = plan_rank(_shards(counts), rank, world_size, num_workers)
        assert plan.num_workers <= num_workers
        assert len(plan.worker_parts) == max(plan.num_workers, 1)
        if plan.num_workers:
            assert all(n > 0 for n in plan.samples_per_worker), "an idle worker"
        for parts in plan.worker_parts:
            for p in parts:
                idx = range(p.offset, p.offset + p.count)
                kept = [i for i in idx if plan.stride == 1 or i % plan.stride == rank]
                assert len(kept) == p.kept
                seen += kept
    assert sorted(seen) == list(range(sum(counts)))


def test_plan_uses_fewer_workers_than_requested_when_shards_are_few() -> None:
    plan = plan_rank(_shards([5, 5, 5]), rank=0, world_size=2, num_workers=4)
    assert plan.num_workers == 2 and plan.stride == 1
    plan = plan_rank(_shards([5]), rank=1, world_size=3, num_workers=4)
    assert plan.num_workers == 1 and plan.stride == 3 and plan.samples_per_worker == [2]


# ---------------------------------------------------------------- train


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    "fixture, world_size, batch_size",
    [("uneven", 2, 3), ("uneven", 3, 2), ("single", 2, 2)],
)
def test_train_every_rank_yields_len_full_batches(
    request, fixture: str, world_size: int, batch_size: int, num_workers: int
) -> None:
    shards = request.getfixturevalue(fixture)
    total = 15 if fixture == "uneven" else 9
    lengths = []
    for rank in range(world_size):
        loader = _loader(
            shards,
            "train",
            batch_size=batch_size,
            train=True,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            seed=1,
        )
        batches = _epoch(loader)
        assert len(batches) == len(loader) == total // (world_size * batch_size)
        for b in batches:
            assert b["pixel_values"].shape == (batch_size, 3, SIZE, SIZE)
            assert b["pixel_values"].dtype == torch.float32
            assert b["labels"].dtype == torch.long and b["labels"].shape == (batch_size,)
            assert set(b["labels"].tolist()) <= {0, 1}
            assert len(b["generator"]) == len(b["key"]) == batch_size
        lengths.append(len(loader))
    assert len(set(lengths)) == 1


def test_train_small_share_repeats_its_stream(uneven: Path) -> None:
    # rank 1 of 2 reads the 3- and 2-sample shards but must still give 2 batches of 3
    loader = _loader(uneven, "train", batch_size=3, train=True, rank=1, world_size=2, num_workers=0)
    assert loader.num_samples == 6 and sum(loader.plan().samples_per_worker) == 5
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 6 and len(set(keys)) == 5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_set_epoch_is_deterministic(uneven: Path, num_workers: int) -> None:
    def sequence(epoch: int) -> list[tuple[list[str], list[int]]]:
        loader = _loader(uneven, "train", batch_size=2, train=True, num_workers=num_workers, seed=5)
        loader.set_epoch(epoch)
        return [(b["key"], b["labels"].tolist()) for b in loader]

    first = sequence(3)
    assert sequence(3) == first
    assert sequence(4) != first


def test_train_augmentation_is_deterministic(single: Path) -> None:
    def pixels() -> torch.Tensor:
        loader = _loader(single, "train", batch_size=3, train=True, num_workers=0, seed=2)
        loader.set_epoch(1)
        return torch.cat([b["pixel_values"] for b in loader])

    torch.testing.assert_close(pixels(), pixels(), atol=0, rtol=0)


def test_train_too_small_is_a_data_error(single: Path) -> None:
    with pytest.raises(DataError, match="too few for world_size 4 x batch_size 4"):
        _loader(single, "train", batch_size=4, train=True, world_size=4)


# ---------------------------------------------------------------- eval


def _all_keys(shards: Path, split: str) -> list[str]:
    return [k for b in _loader(shards, split, batch_size=100, train=False, num_workers=0) for k in b["key"]]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("fixture", ["uneven", "single"])
def test_eval_covers_every_sample_once_and_len_is_exact(
    request, fixture: str, world_size: int, num_workers: int
) -> None:
    shards = request.getfixturevalue(fixture)
    expected = _all_keys(shards, "val")
    assert len(expected) == (11 if fixture == "uneven" else 5)
    got: list[str] = []
    for rank in range(world_size):
        loader = _loader(
            shards,
            "val",
            batch_size=2,
            train=False,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
        )
        batches = _epoch(loader)
        assert len(batches) == len(loader)
        assert all(1 <= len(b["key"]) <= 2 for b in batches)
        assert sum(len(b["key"]) for b in batches) == loader.num_samples
        got += [k for b in batches for k in b["key"]]
    assert sorted(got) == sorted(expected)


def test_eval_order_is_stable(uneven: Path) -> None:
    loader = _loader(uneven, "val", batch_size=3, train=False, num_workers=2)
    first = [b["key"] for b in loader]
    assert [b["key"] for b in loader] == first


def test_generator_filter(uneven: Path) -> None:
    loader = _loader(uneven, "val", batch_size=4, train=False, generators=["b"], num_workers=0)
    batches = _epoch(loader)
    assert {g for b in batches for g in b["generator"]} == {"b"}
    assert sum(len(b["key"]) for b in batches) == 4


# ---------------------------------------------------------------- corrupt data


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory, make_tree) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    src = make_tree(root / "gi", {"a": {"train": (4, 4), "val": (4, 4)}}, size=(20, 16))
    for split in ("train", "val"):
        png = src / "a" / split / "ai" / "ai_000.png"
        png.write_bytes(png.read_bytes()[:60])  # header intact, pixel data cut off
    # verify=False: let the broken file into the shards (the shard tool would drop it), so the
    # loader's own skipping is what is tested.
    shard_genimage(src, root / "shards", max_count=100, progress=False, verify=False)
    return root / "shards"


def test_corrupt_sample_is_skipped_in_eval(corrupt: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    keys = [k for b in _loader(corrupt, "val", batch_size=3, train=False, num_workers=0) for k in b["key"]]
    assert len(keys) == 7 and len(set(keys)) == 7
    assert "skipping sample" in caplog.text


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_sample_does_not_stop_training(corrupt: Path, num_workers: int) -> None:
    loader = _loader(corrupt, "train", batch_size=2, train=True, num_workers=num_workers)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 4
    assert all(len(b["key"]) == 2 for b in batches)


# ---------------------------------------------------------------- pin memory (data.pin_memory)


def _spy_dataloader(monkeypatch) -> list[dict]:
    """Records the keywords ShardLoader gives its torch DataLoader (which is built without pinning)."""
    from ds_trainer.data import pipeline

    calls: list[dict] = []
    real = pipeline.DataLoader

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{**kwargs, "pin_memory": False})

    monkeypatch.setattr(pipeline, "DataLoader", spy)
    return calls


def test_pin_memory_needs_cuda(single: Path, monkeypatch) -> None:
    calls = _spy_dataloader(monkeypatch)
    assert not torch.cuda.is_available()  # this test describes the CPU machine the suite runs on
    loader = _loader(single, "train", batch_size=4, train=True, num_workers=0, pin_memory=True)
    assert len(_epoch(loader)) == 2
    assert loader.requested_pin_memory and calls[-1]["pin_memory"] is False
    # where CUDA is available the flag is what the DataLoader gets
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for asked in (True, False):
        loader = _loader(single, "train", batch_size=4, train=True, num_workers=0, pin_memory=asked)
        _epoch(loader)
        assert calls[-1]["pin_memory"] is asked


def test_pin_memory_reaches_the_loaders_from_the_config(single: Path) -> None:
    from ds_trainer.config import Config
    from ds_trainer.distributed import DistEnv
    from ds_trainer.run import build_loaders

    for asked in (True, False):
        cfg = Config(data={"shards": str(single), "image_size": 32, "num_workers": 0, "pin_memory": asked},
                     training={"batch_size": 4})  # fmt: skip
        train, val = build_loaders(cfg, DistEnv(rank=0, local_rank=0, world_size=1), train=True)
        assert train.requested_pin_memory is asked and val.requested_pin_memory is asked
        assert train.pin_memory is (asked and torch.cuda.is_available())


def test_pinned_batches_keep_their_structure(single: Path, corrupt: Path, monkeypatch) -> None:
    """torch's pin step (DataLoader pin_memory=True) on the loader's dict batches: tensors pinned, the rest as is.

    Page-locking needs CUDA, so Tensor.pin_memory is replaced by a copy that marks its result.
    """
    from torch.utils.data._utils.pin_memory import pin_memory

    def fake_pin(self, device=None):
        out = self.clone()
        out.pinned_here = True
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batches = _epoch(_loader(single, "train", batch_size=4, train=True, num_workers=0))
    batches += _epoch(_loader(corrupt, "val", batch_size=3, train=False, num_workers=0))
    assert sum(b["bad_samples"] for b in batches) == 1  # the corrupt val image
    for batch in batches:
        pinned = pin_memory(batch)
        assert type(pinned) is dict and pinned.keys() == batch.keys()
        for name in ("pixel_values", "labels"):
            assert getattr(pinned[name], "pinned_here", False) and torch.equal(pinned[name], batch[name])
        for name in ("generator", "key", "bad_samples", "worker", "position"):
            assert pinned[name] == batch[name] and type(pinned[name]) is type(batch[name])
        assert all(isinstance(k, str) for k in pinned["key"])
