"""Where this process sits in the job, and the process group.

The deepspeed launcher and torchrun export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
a task of a multi-task Slurm job step (`srun launch.sh ...`, one task per GPU or CPU rank)
has SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS/SLURM_STEP_NODELIST instead, which
`init_distributed` maps onto the same variables (no mpi4py needed); a plain `python train.py`
exports nothing and runs as a world of one. Launcher variables win when both are present:
a deepspeed launcher started inside an srun step sets RANK for its children.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_trainer.ds_config import DeviceInfo
from ds_trainer.slurm import export_slurm_env, in_slurm_task, slurm_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, local rank and world size: the launcher's variables, else a Slurm task's, else 1 process."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and in_slurm_task(environ):
        task = slurm_task(environ, resolve_master=False)
        return DistEnv(rank=task.rank, local_rank=task.local_rank, world_size=task.world_size)
    return DistEnv(
        rank=int(environ.get("RANK", 0)),
        local_rank=int(environ.get("LOCAL_RANK", 0)),
        world_size=int(environ.get("WORLD_SIZE", 1)),
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

    export_slurm_env()
    if "RANK" not in os.environ:
        # A single process started without a launcher: give it a world of one, so the same
        # code path (collectives included) runs as under the launcher.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    if not dist.is_initialized():
        from ds_trainer.ops import install_build_guard

        # The CPU backend loads (on a first launch: compiles) its all-reduce op right here.
        install_build_guard()
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter):  # "... built successfully", from every rank, even when cached
                deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
        finally:
            for line in chatter.getvalue().splitlines():
                log.debug("deepspeed: %s", line)
        _share_cpu_threads()
        _unlink_shm_buffer()
        atexit.register(_destroy_at_exit)
    return read_env()


_ended_cleanly = False


def end_cleanly() -> None:
    """This process's command finished, or every rank agreed to stop (preemption): no collective is
    in flight, so the process group is destroyed at exit (`_destroy_at_exit`)."""
    global _ended_cleanly
    _ended_cleanly = True


def _destroy_at_exit() -> None:
    """Destroy the process group while the interpreter is still whole, after a clean end only.

    Left to the interpreter's finalisation, gloo's worker threads can still hold work whose tensors
    reach back into Python; destroying them then aborts the process ("terminate called without an
    active exception", exit -6), which turned a preempted rank's exit 75 into 250 in CI. After a
    failure the group is left alone: a peer may be gone mid-collective, and destroying would wait on it.
    """
    import torch.distributed as dist

    if _ended_cleanly and dist.is_available() and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
        log.debug("process group destroyed at exit")


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int, env: Mapping[str, str] | None = None) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce (ShareMemComm) creates for `rank`.

    Named as in DeepSpeed's `shm.cpp`: prefix, uid, MASTER_ADDR, MASTER_PORT, rank.
    """
    env = os.environ if env is None else env
    return SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def _unlink_shm_buffer() -> None:
    """Remove the name of this rank's shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed's CPU backend creates a 66 MiB file in /dev/shm per rank and never unlinks it, so
    every run leaks RAM (tmpfs) until the machine runs out: a few hundred runs fill 24 GiB. The
    mappings stay valid after the unlink, and DeepSpeed opens the files only while it initialises,
    so after a barrier (all ranks have opened all buffers) each rank removes its own name.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    world = dist.get_world_size()
    # DeepSpeed's own condition for creating the buffers (shm_interface.cpp): the CPU backend
    # and LOCAL_SIZE == world size. Every rank takes the same branch, so the barrier cannot hang.
    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(world):
        return
    if world > 1:
        dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def _share_cpu_threads() -> None:
    """On a CPU, N local ranks each using every core oversubscribe it N-fold; give each its share."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if in_slurm_task() and ("SLURM_CPUS_PER_TASK" in os.environ or "SLURM_CPUS_ON_NODE" in os.environ):
        # Slurm gave this task its CPUs (without task/affinity, os.cpu_count() still sees the whole host).
        per_task = os.environ.get("SLURM_CPUS_PER_TASK")
        threads = int(per_task) if per_task else int(os.environ["SLURM_CPUS_ON_NODE"]) // max(1, local)
    else:
        threads = (os.cpu_count() or 1) // max(1, local)
    torch.set_num_threads(max(1, threads))


def reserve_cpu_threads(loader_workers: int) -> int | None:
    """On a CPU, leave one core per data-loader worker process: torch threads = this rank's share - workers.

    Decoding workers and the step's OpenMP threads on the same cores oversubscribe them, and OpenMP
    threads spin-wait on each other when a core is taken: measured here (2 cores, 1 worker) the
    tiny model's step ran 10-20x slower with 2 threads than with 1 (benchmarks/train_throughput.py).
    OMP_NUM_THREADS, when set, is the user's choice and wins. Returns the new thread count, or None.
    """
    from deepspeed.accelerator import get_accelerator

    if loader_workers <= 0 or get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, torch.get_num_threads() - loader_workers)
    torch.set_num_threads(threads)
    return threads


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
