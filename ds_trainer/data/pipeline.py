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
an image that does not decode, is smaller than MIN_IMAGE_SIDE or larger than MAX_IMAGE_PIXELS; a
label missing or not 0/1; a key repeated within its shard; and every sample the manifest counts in a
shard that could not be read (missing, empty or truncated tar), so the count says how much was lost.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from ds_trainer.data.manifest import ShardInfo, load_manifest
from ds_trainer.data.scan import IMAGE_KEYS
from ds_trainer.data.transforms import clip_preprocess
from ds_trainer.errors import DataError

logger = logging.getLogger(__name__)

# Images below this side are refused in training and evaluation alike: no detector input can be
# made from them (GenImage's smallest are BigGAN's 128 x 128), and a 1 x 1 file is a broken export.
MIN_IMAGE_SIDE = 8
# Refused from the header, before any pixel is decoded: a PNG can declare 20,000 x 20,000 in a few
# hundred bytes and take GiBs to decode. GenImage's largest images (ImageNet reals) are far below;
# this is also below PIL's own limit (Image.MAX_IMAGE_PIXELS, ~89.5 M), whose warning is refused too.
MAX_IMAGE_PIXELS = 8192 * 8192
# Marks a stand-in for a sample that was counted but could not be read: _decode counts it as bad.
_UNREADABLE = "__unreadable__"


class _Unreadable(Exception):
    """A stand-in met in _decode: bad, and already logged by _shard_samples."""


@dataclass(frozen=True)
class ShardPart:
    """A shard as one rank reads it: all of it, or (stride > 1) every stride-th sample."""

    url: str
    generator: str
    count: int
    offset: int  # index of the shard's first sample within the whole selection
    kept: int  # samples of this shard the rank keeps


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads: one list of parts per worker stream, and how samples are kept."""

    worker_parts: list[list[ShardPart]]
    num_workers: int  # DataLoader num_workers; 0 = read in the main process
    stride: int  # 1: whole shards per rank; world_size: keep index % world_size == rank

    @property
    def samples_per_worker(self) -> list[int]:
        return [sum(p.kept for p in parts) for parts in self.worker_parts]


def _kept_below(n: int, rank: int, world_size: int) -> int:
    """How many i in [0, n) have i % world_size == rank."""
    return max(0, (n - rank + world_size - 1) // world_size)


def _balance(parts: list[ShardPart], bins: int) -> list[list[ShardPart]]:
    # Longest-processing-time assignment: sizes as even as shards allow. Shard counts are
    # mostly equal, so ties are broken by the given order (which a train epoch shuffles).
    # A lighter bin repeats its samples more often in training, hence the balancing.
    out: list[list[ShardPart]] = [[] for _ in range(bins)]
    loads = [0] * bins
    for part in sorted(parts, key=lambda p: p.kept, reverse=True):
        i = min(range(bins), key=lambda b: (loads[b], b))
        out[i].append(part)
        loads[i] += part.kept
    return [sorted(b, key=lambda p: p.offset) for b in out]


def plan_rank(
    shards: list[ShardInfo],
    rank: int,
    world_size: int,
    num_workers: int,
    shuffle_seed: str | None = None,
) -> RankPlan:
    """Assign shards to this rank, then to its DataLoader workers.

    With at least world_size shards each rank reads whole shards. With fewer, every rank reads
    all shards and keeps samples whose index % world_size == rank, so no rank is left empty.
    Workers are min(num_workers, parts this rank reads), so no worker is ever idle.
    `shuffle_seed` (train) reshuffles which shards go to which rank, identically on all ranks.
    """
    parts: list[ShardPart] = []
    offset = 0
    for s in shards:
        parts.append(ShardPart(s.url, s.generator, s.count, offset, s.count))
        offset += s.count
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(parts)

    if len(parts) >= world_size:
        stride = 1
        mine = _balance(parts, world_size)[rank]
    else:
        stride = world_size
        mine = []
        for p in sorted(parts, key=lambda p: p.offset):
            end = p.offset + p.count
            kept = _kept_below(end, rank, world_size) - _kept_below(p.offset, rank, world_size)
            if kept:
                mine.append(replace(p, kept=kept))

    workers = min(num_workers, len(mine))
    worker_parts = _balance(mine, workers) if workers > 1 else [mine]
    return RankPlan(worker_parts=worker_parts, num_workers=workers, stride=stride)


def _log_and_continue(url: str, exc: Exception) -> bool:
    # webdataset's warn_and_continue sleeps 0.5 s per error; a log line is enough here. What the
    # error cost is counted once the shard ends (_shard_samples compares with the manifest).
    logger.warning("unreadable tar data in %s: %s: %s", url, type(exc).__name__, exc)
    return True


def _split_repeated_members(files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """End the current sample when one of its member names comes again.

    webdataset's group_by_keys merges adjacent members that share a key and drops a repeated
    extension with an error, so two adjacent samples with the same key would silently become one
    (holding both images). Its own end-of-shard marker ({}) keeps them apart, so _shard_samples
    sees the repeat and counts it as bad.
    """
    key, suffixes = None, set()
    for member in files:
        if member:  # {} is the end-of-shard marker
            prefix, suffix = tariterators.base_plus_ext(member["fname"])
            if prefix is not None:
                suffix = suffix.lower()  # as group_by_keys does
                if prefix != key:
                    key, suffixes = prefix, set()
                elif suffix in suffixes:
                    yield {}
                    suffixes = set()
                suffixes.add(suffix)
        yield member


def _unreadable(part: ShardPart, key: str) -> dict[str, Any]:
    return {"__key__": key, "__url__": part.url, "__generator__": part.generator, _UNREADABLE: True}


def _shard_samples(parts: list[ShardPart], stride: int, rank: int) -> Iterator[dict[str, Any]]:
    """Raw samples of each shard in turn, with stand-ins (_UNREADABLE) for bad ones.

    A repeated key is bad (its sample is not what the manifest counted). A shard that cannot be
    opened or ends early (missing, empty, truncated) yields a stand-in for each sample the manifest
    counts but the tar did not give, so the shortfall reaches `bad_samples` and the stride keeps
    assigning the shard's indices to the same ranks.
    """
    for part in parts:
        # one reader per shard so the enumerate index is the index inside the shard
        handler = functools.partial(_log_and_continue, part.url)
        files = tariterators.tar_file_expander(tariterators.url_opener([{"url": part.url}], handler=handler),
                                               handler=handler)
        samples = tariterators.group_by_keys(_split_repeated_members(files), handler=handler)
        seen: set[str] = set()
        read, key = 0, None
        for i, sample in enumerate(samples):
            read, key = i + 1, sample["__key__"]
            repeated = key in seen
            seen.add(key)
            if stride > 1 and (part.offset + i) % stride != rank:
                continue
            if repeated:
                logger.warning("skipping sample %s of %s: its key came earlier in the shard", key, part.url)
                sample = _unreadable(part, key)
            sample["__generator__"] = part.generator
            yield sample
        if read < part.count:
            logger.warning(
                "shard %s gave %d of the %d samples its manifest counts (%s); the %d unread are counted as bad",
                part.url, read, part.count, f"last read: {key}" if key else "none read", part.count - read,
            )  # fmt: skip
        for i in range(read, part.count):
            if stride == 1 or (part.offset + i) % stride == rank:
                yield _unreadable(part, f"{Path(part.url).name}#{i}")


def _read_samples(
    parts: list[ShardPart],
    *,
    stride: int,
    rank: int,
    repeat: bool,
    rng: random.Random | None,
    shuffle_buffer: int,
) -> Iterator[dict[str, Any]]:
    """Raw samples of `parts`. With `repeat` (train): pass after pass, each pass in a new shard
    order and sample-shuffled on its own, so a rank that must repeat its share sees every
    sample once before it sees any twice."""
    while True:
        order = list(parts)
        if rng is not None:
            rng.shuffle(order)
        samples = _shard_samples(order, stride, rank)
        if rng is not None and shuffle_buffer > 1:
            samples = wds.shuffle(shuffle_buffer, initial=min(100, shuffle_buffer), rng=rng)(samples)
        yielded = 0
        for sample in samples:
            yielded += 1
            yield sample
        if not repeat:
            return
        if yielded == 0:
            urls = ", ".join(p.url for p in parts) or "no shards"
            raise DataError(f"no sample could be read from {urls}; re-create the shards")


Preprocessor = Callable[..., torch.Tensor]  # (img, label, train, rng) -> [3, S, S]


def _clip_preprocessor(image_size: int) -> Preprocessor:
    return functools.partial(_clip_preprocess, image_size=image_size)


def _clip_preprocess(img: Image.Image, label: int, train: bool, rng: random.Random | None, *, image_size: int) -> torch.Tensor:
    return clip_preprocess(img, image_size, train=train, rng=rng)


def _label(sample: dict[str, Any]) -> int:
    if "cls" not in sample:
        raise ValueError("no .cls member (the label)")
    label = int(sample["cls"])
    if label not in (0, 1):
        raise ValueError(f"label {label} is neither 0 (nature) nor 1 (ai)")
    return label


def _open_image(sample: dict[str, Any]) -> Image.Image:
    """The sample's image with only its header read, refused if its size is out of bounds.

    Checked before decoding, so a decompression bomb costs a header read. PIL refuses above twice
    its own limit (DecompressionBombError) and only warns above it; the warning is made an error.
    """
    image_key = next((k for k in sample if k in IMAGE_KEYS), None)
    if image_key is None:
        raise ValueError(f"no image member (one of .{', .'.join(sorted(IMAGE_KEYS))})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(sample[image_key]))
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        problem = f"over MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS}); not decoded"
    elif min(w, h) < MIN_IMAGE_SIDE:
        problem = f"a side is below MIN_IMAGE_SIDE ({MIN_IMAGE_SIDE})"
    else:
        return img
    img.close()
    raise ValueError(f"image is {w}x{h} pixels, {problem}")


def _decode(
    samples: Iterator[dict[str, Any]],
    *,
    train: bool,
    preprocess: Preprocessor,
    seed_tag: str,
    worker: int,
    skip_raw: int,
    max_failures_in_row: int,
) -> Iterator[dict[str, Any]]:
    skipped = 0
    in_row = 0
    pending_bad = 0
    position = 0
    for sample in samples:
        position += 1
        if position <= skip_raw:
            continue  # read before the interruption: fast-forward without decoding
        key = sample.get("__key__", "?")
        # Seeded per sample, not drawn from one stream: resuming mid-epoch must not shift it.
        rng = random.Random(f"{seed_tag}:{key}") if train else None
        try:
            if sample.get(_UNREADABLE):
                raise _Unreadable
            label = _label(sample)
            with _open_image(sample) as img:
                pixels = preprocess(img, label=label, train=train, rng=rng)
        except Exception as exc:  # broken images raise many types; one bad file must not stop training
            skipped += 1
            in_row += 1
            pending_bad += 1
            if not isinstance(exc, _Unreadable):  # stand-ins were logged where they were made
                logger.warning(
                    "skipping sample %s of %s: %s: %s (%d skipped so far in this worker)",
                    key, sample.get("__url__", "?"), type(exc).__name__, exc, skipped,
                )  # fmt: skip
            if train and in_row > max_failures_in_row:
                # a repeating stream of nothing but failures would spin forever
                raise DataError(
                    f"no image in {sample.get('__url__', '?')} can be decoded; re-create the shards"
                ) from exc
            continue
        in_row = 0
        yield {
            "pixel_values": pixels, "label": label, "generator": sample["__generator__"], "key": key,
            "bad": pending_bad, "worker": worker, "position": position,
        }  # fmt: skip
        pending_bad = 0
    if pending_bad:
        # the stream (eval: finite) ended on bad samples; this tail carries their count
        yield {"bad": pending_bad, "worker": worker, "position": position}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch; an eval batch may end with _decode's tail, or be only that (no samples: see ShardLoader)."""
    samples = [s for s in items if "pixel_values" in s]
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]) if samples else torch.zeros(0),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "generator": [s["generator"] for s in samples],
        "key": [s["key"] for s in samples],
        "bad_samples": sum(s["bad"] for s in items),
        "worker": items[-1]["worker"],
        "position": items[-1]["position"],  # raw samples this worker had read by the end of the batch
    }


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


class _RankStream(IterableDataset):
    """One rank's stream; inside a DataLoader worker it reads only that worker's parts."""

    def __init__(
        self,
        plan: RankPlan,
        *,
        train: bool,
        batch_size: int,
        preprocess: Preprocessor,
        shuffle_buffer: int,
        seed_tag: str,
        rank: int,
        skip_raw: dict[int, int] | None = None,
        rotate: int = 0,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.train = train
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.shuffle_buffer = shuffle_buffer
        self.seed_tag = seed_tag
        self.rank = rank
        self.skip_raw = skip_raw or {}
        self.rotate = rotate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        streams = max(1, self.plan.num_workers)
        # After a resume, DataLoader worker 0 plays the stream whose batch comes next.
        worker = ((info.id if info is not None else 0) + self.rotate) % streams
        parts = self.plan.worker_parts[worker]
        tag = f"{self.seed_tag}:{worker}"
        pipeline = wds.DataPipeline(
            functools.partial(
                _read_samples,
                parts,
                stride=self.plan.stride,
                rank=self.rank,
                repeat=self.train,
                rng=random.Random(f"{tag}:order") if self.train else None,
                shuffle_buffer=self.shuffle_buffer,
            ),
            functools.partial(
                _decode,
                train=self.train,
                preprocess=self.preprocess,
                seed_tag=f"{tag}:augment",
                worker=worker,
                skip_raw=self.skip_raw.get(worker, 0),
                max_failures_in_row=max(sum(p.kept for p in parts), 1),
            ),
            # train batches are always full: the stream is endless, a partial one never forms
            wds.batched(self.batch_size, collation_fn=_collate, partial=not self.train),
        )
        return iter(pipeline)


class ShardLoader:
    """Iterable of dict batches for one rank; build it with make_shard_loader.

    Batches: {"pixel_values": float [B,3,S,S], "labels": long [B], "generator": list[str],
    "key": list[str]}. Call set_epoch(e) before each epoch; the same (seed, epoch, rank,
    world_size, num_workers) always gives the same batches.

    `pin_memory`: on a GPU machine the DataLoader copies each batch's tensors into page-locked
    memory (its pin thread, off the training loop), so `.to(device, non_blocking=True)` overlaps
    the copy with compute; strings and counts pass through unchanged. Without CUDA it is off.
    """

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
        self.preprocess = preprocess or _clip_preprocessor(image_size)
        self.epoch = 0
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
        self._resume = {"epoch": self.epoch, "batches": int(state["batches"]),
                        "positions": {int(k): int(v) for k, v in state["positions"].items()}}

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
        shuffle_seed = f"{self.seed}:{self.epoch}:shards" if self.train else None
        return plan_rank(self.shards, self.rank, self.world_size, self.requested_workers, shuffle_seed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        if self._len == 0:
            return
        resume, self._resume = self._resume, None
        produced = resume["batches"] if resume else 0
        positions = dict(resume["positions"]) if resume else {}
        streams = max(1, plan.num_workers)
        stream = _RankStream(
            plan,
            train=self.train,
            batch_size=self.batch_size,
            preprocess=self.preprocess,
            shuffle_buffer=self.shuffle_buffer,
            seed_tag=f"{self.seed}:{self.epoch}:{self.rank}",
            rank=self.rank,
            skip_raw=positions,
            rotate=produced % streams,
        )
        loader = DataLoader(
            stream, batch_size=None, num_workers=plan.num_workers, persistent_workers=False, pin_memory=self.pin_memory
        )
        self._consumed = {"epoch": self.epoch, "batches": produced, "positions": positions}
        if self.train and produced >= self._len:
            return
        # train streams are endless; stopping at len is what makes every rank agree
        for batch in loader if self.train else _fold_empty(loader, f"{self.name}: rank {self.rank}"):
            positions[batch["worker"]] = batch["position"]
            produced += 1
            self._consumed["batches"] = produced
            yield batch
            if self.train and produced == self._len:
                return
        if self.train:
            raise DataError(
                f"{self.name}: stream of rank {self.rank} ended after {produced} of {self._len} batches"
            )
        if produced != self._len:
            logger.warning(
                "%s: rank %d yielded %d batches, expected %d (undecodable samples were skipped)",
                self.name,
                self.rank,
                produced,
                self._len,
            )


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


def split_holdout(shards: list[ShardInfo], fraction: float, name: str) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """(kept, held out): per generator, round(fraction x shards) of its shards, evenly spread.

    Whole shards, so every count stays known from the manifest (equal batches per rank).
    """
    kept: list[ShardInfo] = []
    held: list[ShardInfo] = []
    by_generator: dict[str, list[ShardInfo]] = {}
    for s in shards:
        by_generator.setdefault(s.generator, []).append(s)
    for generator, group in sorted(by_generator.items()):
        n_held = round(fraction * len(group))
        if n_held < 1 or n_held >= len(group):
            raise DataError(
                f"{name}: holdout_fraction {fraction:g} of {generator}'s {len(group)} shard(s) leaves "
                f"{'nothing to hold out' if n_held < 1 else 'nothing to train on'}; re-shard with a smaller "
                "--max-count so each generator has more shards, or change data.holdout_fraction"
            )
        picks = {math.floor((i + 0.5) * len(group) / n_held) for i in range(n_held)}
        for i, s in enumerate(group):
            (held if i in picks else kept).append(s)
    return kept, held
