"""Streaming batches from WebDataset shards, split by rank then by DataLoader worker.

The shape follows open_clip (shards -> split by node -> split by worker -> tar samples ->
shuffle -> decode -> batch), with two guarantees DeepSpeed needs and open_clip leaves to luck:

* TRAIN: every rank yields exactly len(loader) full batches per epoch. The length comes from the
  manifest counts alone (no communication); a rank whose share is smaller repeats its stream.
  If ranks disagreed, the last collective of the epoch would hang.
* EVAL: every sample of the selection is read by exactly one rank exactly once, and len(loader)
  is the exact number of batches this rank yields, so the trainer can pad the shorter ranks.

The shard -> rank -> worker assignment is a pure function of the manifest (and of seed/epoch in
training), which is what makes both guarantees computable up front.

Exact resume: every batch carries the worker that made it and how many raw samples that worker
had read by then. `ShardLoader.state_dict()` keeps those positions for the batches the trainer
consumed; after `load_state_dict()` each worker fast-forwards its raw stream (tar reads and the
shuffle buffer, no decoding) to its position, and the workers are rotated so batches keep their
round-robin order. Augmentation randomness is seeded per sample key, not drawn from a stream, so
the skipped samples do not shift it. An interrupted epoch thus yields exactly the batches the
uninterrupted one would have.

Bad samples are skipped and counted, never raised: each batch carries `bad_samples`, the skips
since the previous batch of its worker, so the trainer can enforce `data.max_bad_fraction`. Bad is:
an image that does not decode or is out of the size bounds (image_limits: sides, pixels, aspect
ratio); a label missing or not 0/1; a key repeated within its shard; and every sample the manifest counts in a
shard that could not be read (missing, empty or truncated tar), so the count says how much was lost.

The stages: rank_plan (who reads which samples), tar_stream (raw samples and stand-ins), decode
(checks, decoding, batches); this module runs them per rank as the ShardLoader.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import multiprocessing
import random
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ds_trainer.data.decode import Preprocessor, clip_preprocessor, collate, decode_samples
from ds_trainer.data.device_decode import for_loader
from ds_trainer.data.manifest import ShardInfo, load_manifest
from ds_trainer.data.prepared import for_run
from ds_trainer.data.rank_plan import RankPlan, plan_rank, split_holdout
from ds_trainer.data.tar_stream import read_samples
from ds_trainer.errors import DataError

logger = logging.getLogger(__name__)


def _fold_empty(batches: Iterable[dict[str, Any]], where: str) -> Iterator[dict[str, Any]]:
    """Eval batches, minus those without a sample (a worker's stream ended on bad samples).

    The trainer runs the model on every batch (an empty one would give a NaN loss), but their
    `bad_samples` must still be counted: they go to the batch before, held back by one for that,
    or to the next one when none came before.
    """
    held: dict[str, Any] | None = None
    for batch in batches:
        if held is not None and not batch["key"]:
            held["bad_samples"] += batch["bad_samples"]
            continue
        if held is not None and not held["key"]:
            batch["bad_samples"] += held["bad_samples"]
        elif held is not None:
            yield held
        held = batch
    if held is not None and held["key"]:
        yield held
    elif held is not None:
        logger.warning("%s: no sample could be used; its %d bad samples are in no batch", where, held["bad_samples"])


def _refused(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches, until one says the run is refused (decode gpu met a sample that is not a JPEG)."""
    for batch in batches:
        if "refused" in batch:
            raise DataError(batch["refused"])
        yield batch


class _Pass:
    """Where one pass over the rank's stream starts: the epoch, the rotation of the workers and each stream's
    raw position (exact resume), in memory shared with the loader's workers.

    The ShardLoader writes it before each pass; a worker reads it when its stream starts, which for a
    persistent worker is when the DataLoader's next iterator restarts it (the restart is queued after the
    write, so the worker sees it).
    """

    def __init__(self, streams: int) -> None:
        self._values = multiprocessing.RawArray("q", 2 + streams)  # epoch, rotation, a raw position per stream

    def write(self, epoch: int, rotate: int, positions: dict[int, int]) -> None:
        values = self._values
        values[0], values[1] = epoch, rotate
        for stream in range(len(values) - 2):
            values[2 + stream] = positions.get(stream, 0)

    def read(self) -> tuple[int, int, dict[int, int]]:
        values = self._values
        return values[0], values[1], {i: values[2 + i] for i in range(len(values) - 2) if values[2 + i]}


class _RankStream(IterableDataset):
    """One rank's stream; inside a DataLoader worker it reads only that worker's parts.

    Each pass reads its start from `start` (_Pass) and plans its epoch with `plan_for`, so one set of
    persistent workers serves every epoch.
    """

    def __init__(
        self,
        plan_for: Callable[[int], RankPlan],
        start: _Pass,
        *,
        train: bool,
        batch_size: int,
        preprocess: Preprocessor,
        shuffle_buffer: int,
        seed: int,
        rank: int,
    ) -> None:
        super().__init__()
        self.plan_for = plan_for
        self.start = start
        self.train = train
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, rotate, skip_raw = self.start.read()
        plan = self.plan_for(epoch)
        info = get_worker_info()
        streams = max(1, plan.num_workers)
        # After a resume, DataLoader worker 0 plays the stream whose batch comes next.
        worker = ((info.id if info is not None else 0) + rotate) % streams
        parts = plan.worker_parts[worker]
        tag = f"{self.seed}:{epoch}:{self.rank}:{worker}"
        pipeline = wds.DataPipeline(
            functools.partial(
                read_samples,
                parts,
                stride=plan.stride,
                rank=self.rank,
                repeat=self.train,
                rng=random.Random(f"{tag}:order") if self.train else None,
                shuffle_buffer=self.shuffle_buffer,
            ),
            functools.partial(
                decode_samples,
                train=self.train,
                preprocess=self.preprocess,
                seed_tag=f"{tag}:augment",
                worker=worker,
                skip_raw=skip_raw.get(worker, 0),
                max_failures_in_row=max(sum(p.kept for p in parts), 1),
            ),
            # train batches are always full: the stream is endless, a partial one never forms
            wds.batched(self.batch_size, collation_fn=collate, partial=not self.train),
        )
        return iter(pipeline)


# Each ShardLoader's DataLoader, held here rather than by the loader: a loader collected as part of a
# reference cycle (a Trainer's, say) then stops its workers with the DataLoader's queues still working. Held
# by the loader itself, the DataLoader would be in the same garbage, its queues' finalisers could run first,
# its stop message would never reach the workers, and its shutdown would wait 5 s for each before killing it.
_WORKERS: dict[int, DataLoader] = {}
_TOKENS = itertools.count()


def _stop_workers(token: int) -> None:
    loader = _WORKERS.pop(token, None)
    workers = getattr(loader, "_iterator", None)  # the DataLoader's persistent iterator: its workers
    if workers is not None and hasattr(workers, "_shutdown_workers"):
        workers._shutdown_workers()


def _epoch_plan(
    shards: list[ShardInfo], rank: int, world_size: int, workers: int, seed: int, train: bool, epoch: int
) -> RankPlan:
    """The rank's plan for `epoch`: train passes reshuffle which shards go where, identically on every rank."""
    return plan_rank(shards, rank, world_size, workers, f"{seed}:{epoch}:shards" if train else None)


class ShardLoader:
    """Iterable of dict batches for one rank; build it with make_shard_loader.

    Batches: {"pixel_values": float [B,3,S,S] (uint8 with a Preprocess(uint8=True), the trainer's: normalised
    on the device by batches.unpack; [B,K,3,S,S] at eval with data.eval_crops K > 1: the K crops of each
    image stay together in its row), "labels": long [B], "generator": list[str],
    "key": list[str]}; with data.decode gpu "jpeg" and "geometry" instead of "pixel_values", decoded by
    batches.unpack (device_decode). Call set_epoch(e) before each epoch; the same (seed, epoch, rank,
    world_size, num_workers) always gives the same batches.

    `pin_memory`: on a GPU machine the DataLoader copies each batch's tensors into page-locked
    memory (its pin thread, off the training loop), so `.to(device, non_blocking=True)` overlaps
    the copy with compute; strings and counts pass through unchanged. Without CUDA it is off.

    Workers are persistent: they start on the first pass and serve every later one (each epoch, each
    evaluation) until `close()` or the loader is collected. A pass's start (epoch, rotation, fast-forward
    positions) goes to them through shared memory (_Pass), and each worker plans its epoch itself, as the
    main process does; batches a train pass made past len are dropped by the DataLoader when the next pass
    restarts the workers. (The worker count is the same every epoch: the balancing gives a rank the same
    number of shards whatever the shuffle; a plan with another count would start new workers.)

    An eval loader may yield more batches than len() when a shard's tar holds more samples than its
    manifest counts (each is read once, a warning names the shard); `may_exceed_len` tells
    evaluation to read them all.
    """

    may_exceed_len = True

    def __init__(
        self,
        shards: list[ShardInfo],
        *,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        image_size: int = 224,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        name: str = "",
        preprocess: Preprocessor | None = None,
        pin_memory: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.requested_workers = num_workers
        self.requested_pin_memory = pin_memory
        # page-locking needs CUDA; on a CPU the DataLoader would only warn and copy for nothing
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.image_size = image_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.name = name or "shards"
        self.preprocess = preprocess or clip_preprocessor(image_size)
        self.epoch = 0
        self._pass = _Pass(max(1, num_workers))
        self._token = next(_TOKENS)  # its DataLoader, whose workers persist between passes: _WORKERS[token]
        weakref.finalize(self, _stop_workers, self._token)
        self._passes = 0  # passes started: a pass overtaken by a newer one (same workers) must not go on
        self._consumed: dict[str, Any] = {"epoch": 0, "batches": 0, "positions": {}}
        self._resume: dict[str, Any] | None = None
        self.total_samples = sum(s.count for s in self.shards)
        self.generators = sorted({s.generator for s in self.shards})

        if train:
            self._len = self.total_samples // (world_size * batch_size)
            if self._len == 0:
                raise DataError(
                    f"{self.name}: {self.total_samples} training samples are too few for "
                    f"world_size {world_size} x batch_size {batch_size}; use more data, a smaller "
                    "batch size or fewer ranks"
                )
        else:
            plan = self.plan()
            self._len = sum(math.ceil(n / batch_size) for n in plan.samples_per_worker)
            if self._len == 0:
                logger.warning(
                    "rank %d gets no %s samples (%d samples over %d ranks)",
                    rank,
                    self.name,
                    self.total_samples,
                    world_size,
                )

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume["epoch"] != epoch:
            logger.warning("%s: resume state is for epoch %d, not %d; ignored", self.name, self._resume["epoch"], epoch)
            self._resume = None
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is in this epoch: batches taken, raw position of every worker stream."""
        return {
            "epoch": self._consumed["epoch"], "batches": self._consumed["batches"],
            "positions": dict(self._consumed["positions"]), "rank": self.rank, "world_size": self.world_size,
            "workers": max(1, self.plan().num_workers),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch where it stopped (train loaders; used by the next __iter__)."""
        if not self.train:
            return
        same = (state.get("rank"), state.get("world_size")) == (self.rank, self.world_size)
        self.epoch = int(state["epoch"])
        if not same or state.get("workers") != max(1, self.plan().num_workers):
            logger.warning(
                "%s: saved data position is for rank %s of %s with %s workers, this is rank %d of %d with %d: "
                "epoch %d restarts from its beginning (samples may repeat)", self.name, state.get("rank"),
                state.get("world_size"), state.get("workers"), self.rank, self.world_size,
                max(1, self.plan().num_workers), self.epoch,
            )  # fmt: skip
            return
        self._resume = {
            "epoch": self.epoch,
            "batches": int(state["batches"]),
            "positions": {int(k): int(v) for k, v in state["positions"].items()},
        }

    def __len__(self) -> int:
        return self._len

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (train: len * batch_size, repeats included)."""
        if self.train:
            return self._len * self.batch_size
        return sum(self.plan().samples_per_worker)

    def plan(self) -> RankPlan:
        """The shard -> worker assignment of this rank for the current epoch."""
        return self._plan_for(self.epoch)

    @property
    def _plan_for(self) -> Callable[[int], RankPlan]:
        # not a bound method: the workers' dataset must not hold the loader (a cycle that only the garbage
        # collector frees; see _WORKERS)
        return functools.partial(
            _epoch_plan, self.shards, self.rank, self.world_size, self.requested_workers, self.seed, self.train
        )

    def _workers(self, num_workers: int) -> DataLoader:
        """The DataLoader over this rank's stream with `num_workers` workers: the one of the previous pass
        (its workers persist) unless that had another count."""
        loader = _WORKERS.get(self._token)
        if loader is not None and loader.num_workers == num_workers:
            return loader
        self.close()
        stream = _RankStream(
            self._plan_for, self._pass, train=self.train, batch_size=self.batch_size, preprocess=self.preprocess,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=self.rank,
        )  # fmt: skip
        loader = _WORKERS[self._token] = DataLoader(
            stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
            pin_memory=self.pin_memory,
        )  # fmt: skip
        return loader

    def close(self) -> None:
        """Stop the workers now (also done when the loader is collected); the next pass starts new ones."""
        _stop_workers(self._token)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        if not any(plan.worker_parts):  # a shard counted 0 is still read: its tar may hold samples after all
            return
        resume, self._resume = self._resume, None
        produced = resume["batches"] if resume else 0
        positions = dict(resume["positions"]) if resume else {}
        streams = max(1, plan.num_workers)
        self._passes += 1
        this_pass = self._passes
        self._pass.write(self.epoch, produced % streams, positions)
        loader = self._workers(plan.num_workers)
        self._consumed = {"epoch": self.epoch, "batches": produced, "positions": positions}
        if self.train and produced >= self._len:
            return
        # train streams are endless; stopping at len is what makes every rank agree
        checked = _refused(loader)
        for batch in checked if self.train else _fold_empty(checked, f"{self.name}: rank {self.rank}"):
            if self._passes != this_pass:
                raise RuntimeError(
                    f"{self.name}: a new pass over this loader started while this one was being read; its "
                    "workers now serve the new one (read one pass at a time)"
                )
            positions[batch["worker"]] = batch["position"]
            produced += 1
            self._consumed["batches"] = produced
            yield batch
            if self.train and produced == self._len:
                return
        if self.train:
            raise DataError(f"{self.name}: stream of rank {self.rank} ended after {produced} of {self._len} batches")
        if produced != self._len:
            why = "undecodable samples were skipped" if produced < self._len else "a shard holds more than it counts"
            logger.warning("%s: rank %d yielded %d batches, expected %d (%s)", self.name, self.rank, produced,
                           self._len, why)  # fmt: skip


def make_shard_loader(
    shard_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    generators: list[str] | None = None,
    num_workers: int = 2,
    image_size: int = 224,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    preprocess: Preprocessor | None = None,
    holdout_fraction: float = 0.0,
    holdout: bool = False,
    pin_memory: bool = True,
) -> ShardLoader:
    """Loader over the `split` shards of the shard set in `shard_dir` (see ShardLoader).

    `holdout_fraction` > 0 sets aside that share of the split's shards (per generator, spread
    evenly, the same on every run): `holdout=False` reads the rest, `holdout=True` the held-out part.
    `pin_memory` (data.pin_memory) page-locks batches when CUDA is available, else does nothing.
    """
    manifest = load_manifest(shard_dir)
    # a prepared set (ds-trainer prepare): refused when `preprocess` contradicts it, else minus what it holds
    preprocess = for_run(manifest, preprocess, train=train)
    preprocess = for_loader(manifest, preprocess)  # decode gpu: the workers ship JPEG bytes (device_decode)
    shards = manifest.select(split, generators)
    if holdout_fraction > 0:
        kept, held = split_holdout(shards, holdout_fraction, f"{manifest.root}/{split}")
        shards = held if holdout else kept
        split = f"{split} (holdout)" if holdout else f"{split} (minus holdout)"
    return ShardLoader(
        shards,
        batch_size=batch_size,
        train=train,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        image_size=image_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        name=f"{manifest.root}/{split}",
        preprocess=preprocess,
        pin_memory=pin_memory,
    )
