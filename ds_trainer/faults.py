"""Fault injection for the fault-tolerance tests: `DS_TRAINER_FAULT` names what goes wrong, where.

Off unless the variable is set. Faults, comma-separated, each `kind:key=value:...`:

- `kill:step=N[:rank=R]`: SIGKILL this rank (rank 0 by default) right after optimizer step N;
- `crash_in_save:tag=T[:rank=R]`: SIGKILL while saving tag T, after DeepSpeed wrote its files and
  before `ds_trainer.json` marks the tag complete;
- `enospc:tag=T`: saving tag T fails with `OSError(ENOSPC)` from the write path (torch.save);
- `nan:step=N[:count=C][:rank=R]`: the loss of micro-batches N .. N+C-1 (counted from 1 over the
  run, on rank R, every rank by default) is NaN.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ENV = "DS_TRAINER_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    args: dict[str, str]

    def int(self, key: str, default: int | None = None) -> int | None:
        return int(self.args[key]) if key in self.args else default

    def on_rank(self, rank: int, default: int | None = 0) -> bool:
        want = self.int("rank", default)
        return want is None or want == rank


KINDS = ("kill", "crash_in_save", "enospc", "nan")


@functools.lru_cache(maxsize=8)
def parse(spec: str) -> tuple[Fault, ...]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, *pairs = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r}; known: {', '.join(KINDS)}")
        args = dict(pair.split("=", 1) for pair in pairs)
        faults.append(Fault(kind, args))
    return tuple(faults)


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def active(kind: str) -> list[Fault]:
    spec = os.environ.get(ENV)
    return [f for f in parse(spec) if f.kind == kind] if spec else []


def _die(what: str) -> None:
    print(
        f"fault injected ({ENV}): {what}; SIGKILL pid {os.getpid()} at t={time.time():.3f}", file=sys.stderr, flush=True
    )
    os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int, rank: int) -> None:
    for f in active("kill"):
        if f.int("step") == step and f.on_rank(rank):
            _die(f"kill after step {step} on rank {rank}")


def before_marker(tag: str, rank: int) -> None:
    for f in active("crash_in_save"):
        if f.args.get("tag") == tag and f.on_rank(rank):
            _die(f"crash while saving {tag} on rank {rank}")


@contextlib.contextmanager
def saving(tag: str) -> Iterator[None]:
    """While DeepSpeed saves `tag`: an injected ENOSPC from torch.save, if asked for."""
    if not any(f.args.get("tag") == tag for f in active("enospc")):
        yield
        return
    import torch

    real = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    torch.save = full_disk
    try:
        yield
    finally:
        torch.save = real


def nan_loss(micro_step: int, rank: int) -> bool:
    for f in active("nan"):
        first, count = f.int("step"), f.int("count", 1)
        if first is not None and count is not None and first <= micro_step < first + count and f.on_rank(rank, None):
            return True
    return False
