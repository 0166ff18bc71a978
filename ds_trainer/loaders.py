"""Per-rank views of the loaders a user hands the Trainer (the shard loader is already per rank)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


class EvalSampler(Sampler[int]):
    """Rank r takes indices r, r+W, r+2W, ...: every sample exactly once, no padding duplicates."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def distribute(loader: Iterable, rank: int, world_size: int, seed: int, train: bool) -> Iterable:
    """Give a plain DataLoader over a map-style dataset a per-rank sampler, as Lightning does."""
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
        sampler: Sampler[int] = DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=True)
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
