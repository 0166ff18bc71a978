"""Where this process sits in the job, and the process group.

The deepspeed launcher and torchrun export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
a plain `python train.py` exports nothing and runs as a world of one.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_trainer.ds_config import DeviceInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    """Rank, local rank and world size from the launcher's environment (1 process if none)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Join (or, alone, create) the process group DeepSpeed will use. Idempotent."""
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        # A single process started without a launcher: give it a world of one, so the same
        # code path (collectives included) runs as under the launcher.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
        _share_cpu_threads()
    return read_env()


def _share_cpu_threads() -> None:
    """On a CPU, N local ranks each using every core oversubscribe it N-fold; give each its share."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def detect_device() -> DeviceInfo:
    """The accelerator DeepSpeed will use, and whether bf16 is worth using on it."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    kind = acc.device_name()
    if kind == "cpu":
        return DeviceInfo(type="cpu", bf16_supported=_cpu_has_fast_bf16())
    return DeviceInfo(type=kind, bf16_supported=bool(acc.is_bf16_supported()))


def torch_device(env: DistEnv) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(env.local_rank))
