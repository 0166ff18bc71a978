"""Per-rank views of the loaders a user hands the Trainer (the shard loader is already per rank)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, default_collate


class EvalSampler(Sampler[int]):
    """Rank r takes indices r, r+W, r+2W, ...: every sample exactly once, no padding duplicates."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def with_dataset_collate(loader: Iterable) -> Iterable:
    """A DataLoader left with torch's default collate over a dataset that has its own `collate`, with that one.

    GenImageDataset returns a BadSample for a file it cannot use, which torch's collate cannot
    batch; its own collate leaves it out and counts it (`bad_samples`), as the streaming loader does.
    """
    if not isinstance(loader, DataLoader) or loader.collate_fn is not default_collate:
        return loader
    collate = getattr(loader.dataset, "collate", None)
    if not callable(collate):
        return loader
    batching: dict[str, Any] = (
        {"batch_size": loader.batch_size, "sampler": loader.sampler, "drop_last": loader.drop_last}
        if loader.batch_size is not None else {"batch_sampler": loader.batch_sampler}
    )  # fmt: skip
    return DataLoader(
        loader.dataset, **batching, num_workers=loader.num_workers, collate_fn=collate, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
        multiprocessing_context=loader.multiprocessing_context,
    )  # fmt: skip


def distribute(loader: Iterable, rank: int, world_size: int, seed: int, train: bool) -> Iterable:
    """Give a plain DataLoader over a map-style dataset a per-rank sampler, as Lightning does (and see
    with_dataset_collate)."""
    loader = with_dataset_collate(loader)
    if world_size == 1 or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, (DistributedSampler, EvalSampler)) or loader.batch_sampler is None:
        return loader
    dataset = loader.dataset
    if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        return loader
    if train:
        shuffle = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        # drop_last: every rank must run the same number of steps, or the last collective hangs.
        sampler: Sampler[int] = DistributedSampler(
            dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=True
        )
    else:
        sampler = EvalSampler(len(dataset), rank, world_size)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=train,
    )


def workers(loader: Iterable | None) -> int:
    """Worker processes a loader runs beside the step (a ShardLoader's planned ones)."""
    if loader is None:
        return 0
    if hasattr(loader, "plan"):
        return int(loader.plan().num_workers)
    return int(getattr(loader, "num_workers", 0) or 0)


def set_epoch(loader: Iterable, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif isinstance(loader, DataLoader) and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
