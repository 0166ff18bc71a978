"""The streaming loader's workers persist across passes: one set of processes serves every epoch (and every
evaluation), and each pass still yields exactly the batches a fresh loader yields: the epoch's plan, the
rotation and fast-forward of a resume, the stop at len of a train pass."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ds_trainer.data import make_shard_loader

KW = dict(batch_size=4, train=True, world_size=2, num_workers=2, image_size=32, shuffle_buffer=16, seed=3)


def keys(batches):
    return [k for b in batches for k in b["key"]]


def worker_pid(img, label, train=False, rng=None):
    """A preprocessing that records which process made the sample (the pixels are not needed here)."""
    return torch.tensor([os.getpid()], dtype=torch.int64)


def pids(batches):
    return {int(p) for b in batches for p in b["pixel_values"].flatten()}


def fresh_epoch(shards, epoch, **kw):
    loader = make_shard_loader(shards, "train", **{**KW, **kw})
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("rank", [0, 1])
def test_one_set_of_workers_serves_every_epoch_with_each_epochs_own_batches(tiny_shards, rank):
    loader = make_shard_loader(tiny_shards, "train", rank=rank, preprocess=worker_pid, **KW)
    seen = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        # what a new loader (new workers) gives for this epoch: the shuffle of each epoch, not the first one's
        assert keys(batches) == keys(fresh_epoch(tiny_shards, epoch, rank=rank, preprocess=worker_pid))
        seen.append(pids(batches))
    assert len(seen[0]) == 2 and os.getpid() not in seen[0]
    assert seen[0] == seen[1] == seen[2]
    assert keys(fresh_epoch(tiny_shards, 0, rank=rank)) != keys(fresh_epoch(tiny_shards, 1, rank=rank))
    loader.close()


@pytest.mark.parametrize("stop_after", [1, 3])
def test_a_resume_on_the_same_loader_continues_exactly(tiny_shards, stop_after):
    """Stopped mid-epoch and resumed on the same object: its persistent workers fast-forward and rotate as
    new ones would, so the epoch is the uninterrupted one, pixels included, and the next epoch is whole."""
    reference = fresh_epoch(tiny_shards, 2, rank=1)
    loader = make_shard_loader(tiny_shards, "train", rank=1, **KW)
    loader.set_epoch(2)
    seen = []
    for batch in loader:
        seen.append(batch)
        if len(seen) == stop_after:
            break
    loader.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    loader.set_epoch(2)
    rest = list(loader)
    assert keys(seen + rest) == keys(reference)
    for got, want in zip(rest, reference[stop_after:]):
        assert torch.equal(got["pixel_values"], want["pixel_values"])
    loader.set_epoch(3)
    assert keys(loader) == keys(fresh_epoch(tiny_shards, 3, rank=1))
    loader.close()


def test_an_eval_loader_reads_every_sample_once_on_every_pass(tiny_shards):
    loader = make_shard_loader(tiny_shards, "val", **dict(KW, train=False, world_size=1))
    first, second = keys(loader), keys(loader)
    assert sorted(first) == sorted(second) and len(set(first)) == len(first) == 48
    loader.close()


def test_a_pass_overtaken_by_a_newer_one_stops_with_an_error(tiny_shards):
    loader = make_shard_loader(tiny_shards, "train", **KW)
    old = iter(loader)
    next(old)
    new = iter(loader)
    assert next(new)["key"]
    with pytest.raises(RuntimeError, match="a new pass over this loader started"):
        next(old)
    loader.close()


def test_close_stops_the_workers_and_the_next_pass_starts_new_ones(tiny_shards):
    loader = make_shard_loader(tiny_shards, "train", preprocess=worker_pid, **KW)
    before = pids(loader)
    loader.close()
    for pid in before:  # joined by close: gone, not left as zombies
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    after = pids(loader)
    assert len(after) == 2 and after.isdisjoint(before)
    loader.close()
    loader.close()  # idempotent


def test_no_workers_reads_in_the_main_process_on_every_pass(tiny_shards):
    loader = make_shard_loader(tiny_shards, "train", preprocess=worker_pid, **dict(KW, num_workers=0))
    loader.set_epoch(1)
    assert pids(loader) == {os.getpid()}
    assert keys(loader) == keys(fresh_epoch(tiny_shards, 1, preprocess=worker_pid, num_workers=0))


@pytest.mark.parametrize("held_in_a_cycle", [False, True])
def test_a_dropped_loader_stops_its_workers_at_once(tiny_shards, held_in_a_cycle):
    """Dropped without close(), as a Trainer's loaders are: the workers are stopped cleanly, not after the
    DataLoader's 5 s join timeout per worker (what happens when its queues are finalised first, as in a
    reference cycle collected by the garbage collector)."""
    import gc
    import time

    class Holder:
        def __init__(self):
            self.me = self if held_in_a_cycle else None
            self.loader = make_shard_loader(tiny_shards, "train", preprocess=worker_pid, **KW)

    holder = Holder()
    workers = pids(holder.loader)
    assert len(workers) == 2
    start = time.perf_counter()
    del holder
    gc.collect()
    assert time.perf_counter() - start < 3
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
