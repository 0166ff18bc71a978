"""Exact data-position resume, holdout shards and bad-sample counts of the streaming loader."""

import collections
import io
import json
import tarfile

import pytest

from ds_trainer.data import make_shard_loader
from ds_trainer.data.manifest import load_manifest
from ds_trainer.data.rank_plan import split_holdout
from ds_trainer.errors import DataError

KW = dict(batch_size=4, train=True, world_size=2, num_workers=2, image_size=32, shuffle_buffer=16, seed=3)


def keys(batches):
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_interrupted_epoch_resumes_with_exactly_the_unseen_samples(tiny_shards, rank, stop_after):
    full = make_shard_loader(tiny_shards, "train", rank=rank, **KW)
    full.set_epoch(2)
    reference = list(full)
    assert len(reference) == len(full) == 128 // 8

    first = make_shard_loader(tiny_shards, "train", rank=rank, **KW)
    first.set_epoch(2)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == stop_after:
            break
    state = json.loads(json.dumps(first.state_dict()))  # it travels in a JSON-ish client state

    second = make_shard_loader(tiny_shards, "train", rank=rank, **KW)
    second.load_state_dict(state)
    second.set_epoch(2)
    rest = list(second)
    assert len(seen) + len(rest) == len(reference)
    # The same batches in the same order, pixels included (augmentation is seeded per sample).
    assert keys(seen + rest) == keys(reference)
    for got, want in zip(rest, reference[stop_after:]):
        assert (got["pixel_values"] == want["pixel_values"]).all()
    # The next epoch is a normal, full one.
    second.set_epoch(3)
    assert len(list(second)) == len(reference)


def test_resume_state_for_another_world_size_restarts_the_epoch(tiny_shards, caplog):
    first = make_shard_loader(tiny_shards, "train", rank=0, **KW)
    first.set_epoch(1)
    next(iter(first))
    other = make_shard_loader(tiny_shards, "train", rank=0, **dict(KW, world_size=1))
    other.load_state_dict(first.state_dict())
    other.set_epoch(1)
    assert len(list(other)) == len(other)
    assert "restarts from its beginning" in caplog.text


def test_holdout_takes_whole_shards_per_generator(tiny_shards):
    shards = load_manifest(tiny_shards).select("train")
    kept, held = split_holdout(shards, 0.25, "t")
    assert {s.url for s in kept}.isdisjoint({s.url for s in held})
    assert len(kept) + len(held) == len(shards)
    per_gen = collections.Counter(s.generator for s in held)
    assert set(per_gen) == {s.generator for s in shards} and all(n >= 1 for n in per_gen.values())
    train = make_shard_loader(tiny_shards, "train", holdout_fraction=0.25, **dict(KW, world_size=1, train=False))
    hold = make_shard_loader(
        tiny_shards, "train", holdout_fraction=0.25, holdout=True, **dict(KW, world_size=1, train=False)
    )
    train_keys, hold_keys = set(keys(train)), set(keys(hold))
    assert train_keys.isdisjoint(hold_keys) and len(train_keys | hold_keys) == 128
    assert len(hold_keys) == sum(s.count for s in held)
    with pytest.raises(DataError, match="nothing to train on"):
        split_holdout(shards, 0.99, "t")


def test_undecodable_samples_are_skipped_and_counted(tmp_path, tiny_shards):
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    manifest = json.loads((root / "manifest.json").read_text())
    val = next(s for s in manifest["shards"] if s["split"] == "val")
    path = root / val["path"] if "path" in val else next(root.rglob(val["url"].split("/")[-1]))
    # Replace the image bytes of two samples with garbage, keeping the tar valid.
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken, out = 0, io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for m, data in members:
            if broken < 2 and m.name.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg"):
                data, broken = b"not an image", broken + 1
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    path.write_bytes(out.getvalue())
    loader = make_shard_loader(root, "val", **dict(KW, world_size=1, train=False))
    batches = list(loader)
    assert sum(b["bad_samples"] for b in batches) == 2
    assert len(keys(batches)) == loader.num_samples - 2
