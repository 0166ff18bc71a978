"""Where this process sits in the job, and the process group.

The deepspeed launcher and torchrun export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
a task of a multi-task Slurm job step (`srun launch.sh ...`, one task per GPU or CPU rank)
has SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS/SLURM_STEP_NODELIST instead, which
`init_distributed` maps onto the same variables (no mpi4py needed); a plain `python train.py`
exports nothing and runs as a world of one. Launcher variables win when both are present:
a deepspeed launcher started inside an srun step sets RANK for its children.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_trainer.ds_config import DeviceInfo
from ds_trainer.errors import ConfigError

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


# ----------------------------------------------------------------------------------------- Slurm


@dataclass(frozen=True)
class SlurmTask:
    """This process as one task of an srun job step, in the terms torch.distributed wants."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    node_name: str

    def torch_env(self) -> dict[str, str]:
        """The variables the deepspeed launcher would have exported for this rank."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_SIZE": str(self.local_world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "CROSS_RANK": str(self.node_rank),
            "CROSS_SIZE": str(self.num_nodes),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def in_slurm_task(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one task of a multi-task srun step.

    Only srun sets SLURM_STEP_ID: an sbatch script itself also sees SLURM_PROCID=0 and the
    allocation's SLURM_NTASKS, and taking it for rank 0 of N would wait forever for the other N-1.
    A one-task step (`srun --pty bash`, `srun -n1 launch.sh`) is not one either: there launch.sh
    starts the deepspeed launcher on the node's GPUs (or CPU ranks) as it does outside Slurm.
    (launch.sh's bash part applies the same rule.)
    """
    environ = os.environ if environ is None else environ
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    if step is None or "SLURM_PROCID" not in environ:
        return False
    return _int_var(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1) > 1


def _int_var(environ: Mapping[str, str], *names: str, default: int | None = None) -> int:
    """The first of `names` that is set, as an int; a clear error names a malformed one."""
    for name in names:
        if name in environ:
            value = environ[name]
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r} is not an integer") from None
    if default is None:
        raise ConfigError(f"Slurm task without {' or '.join(names)} in its environment")
    return default


def slurm_task(environ: Mapping[str, str] | None = None, resolve_master: bool = True) -> SlurmTask:
    """Map a Slurm task's environment onto rank, local rank, world size and the rendezvous address.

    MASTER_ADDR/MASTER_PORT from the environment win (a test cluster whose node names do not
    resolve, or a site with a separate fast network); otherwise the first host of the step's
    nodelist (where task 0 runs: Slurm places tasks in nodelist order) and a port derived from
    SLURM_JOB_ID, so every task computes the same one without talking to the others.
    """
    environ = os.environ if environ is None else environ
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    node_rank = _int_var(environ, "SLURM_NODEID", default=0)
    if "MASTER_ADDR" in environ:
        master = environ["MASTER_ADDR"]
    elif not nodelist:
        raise ConfigError("Slurm task without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: cannot tell the master host")
    else:
        master = first_host(nodelist) if resolve_master else expand_nodelist(nodelist)[0]
    tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    local_size = expand_tasks_per_node(tasks_per_node)[node_rank] if tasks_per_node else 1
    return SlurmTask(
        rank=_int_var(environ, "SLURM_PROCID"),
        local_rank=_int_var(environ, "SLURM_LOCALID", default=0),
        world_size=_int_var(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
        local_world_size=local_size,
        node_rank=node_rank,
        num_nodes=_int_var(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1),
        master_addr=master,
        master_port=_int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ else slurm_port(environ),
        node_name=environ.get("SLURMD_NODENAME", socket.gethostname()),
    )


def slurm_port(environ: Mapping[str, str]) -> int:
    """A rendezvous port every task of the job derives alike: 12000 + job id mod 20000.

    Below Linux's ephemeral range (32768+), so an outgoing connection is unlikely to hold it;
    two jobs sharing a first node collide only when their ids differ by a multiple of 20000.
    """
    return 12000 + _int_var(environ, "SLURM_JOB_ID", "SLURM_JOBID") % 20000


_HOSTLIST_ITEM = re.compile(r"([^\[\],]*)(?:\[([^\[\]]*)\])?")


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's hostlist syntax in Python: `n[1-2]`, `node01,node02`, `gpu-[01-03,07]`, `r[1-2]-n[01-02]`.

    For where `scontrol show hostnames` is missing (a container with the job's environment but
    no Slurm client). Zero padding follows the range's first bound, as Slurm's does.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_host(item, nodelist))
    if not hosts:
        raise ConfigError(f"Slurm nodelist {nodelist!r} names no hosts")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas that separate hosts, not those inside a bracketed range list."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ConfigError(f"Slurm nodelist {nodelist!r} has unbalanced or nested brackets")
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ConfigError(f"Slurm nodelist {nodelist!r} has an unclosed '['")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_host(item: str, nodelist: str) -> list[str]:
    """One comma-free item, each bracket group multiplying out: a[1-2]b[3,5] -> a1b3 a1b5 a2b3 a2b5."""
    names = [""]
    pos = 0
    while pos < len(item):
        m = _HOSTLIST_ITEM.match(item, pos)
        if m is None or m.end() == pos:
            raise ConfigError(f"Slurm nodelist {nodelist!r}: cannot parse {item!r}")
        prefix, ranges = m.group(1), m.group(2)
        choices = [prefix] if ranges is None else [prefix + n for n in _expand_ranges(ranges, nodelist)]
        names = [name + choice for name in names for choice in choices]
        pos = m.end()
    return names


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """`01-03,07` -> 01 02 03 07 (the width of a range's first bound pads the whole range)."""
    out = []
    for part in ranges.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if m is None:
            raise ConfigError(f"Slurm nodelist {nodelist!r}: bad range {part!r} in [{ranges}]")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ConfigError(f"Slurm nodelist {nodelist!r}: range {part!r} runs backwards")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def hostnames(nodelist: str) -> list[str]:
    """A nodelist's hosts: `scontrol show hostnames` (every form Slurm knows), else Python's parse.

    scontrol can stall for a minute retrying an unreadable slurm.conf, hence the timeout.
    """
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10,
                stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
            hosts = out.stdout.split()
            if out.returncode == 0 and hosts:
                return hosts
            log.debug("scontrol show hostnames %s failed (%s); parsing it here", nodelist, out.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("scontrol show hostnames %s failed (%s); parsing it here", nodelist, exc)
    return expand_nodelist(nodelist)


def first_host(nodelist: str) -> str:
    """Where task 0 of a step runs: Slurm places tasks in nodelist order."""
    return hostnames(nodelist)[0]


def expand_tasks_per_node(value: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE `2(x3),1` -> [2, 2, 2, 1]: tasks on each node of the step, in node order."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={value!r}: cannot parse {part!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def slurm_node_launcher_args(slots: int, environ: Mapping[str, str] | None = None) -> list[str]:
    """deepspeed launcher arguments for one launcher per node of an srun step (`DS_TRAINER_SLURM_MODE=node`).

    The launcher needs every node's slot count (a hostfile) to number the ranks, and with --no_ssh
    each node's own index; it never contacts the hosts named in the hostfile. Assumes `slots`
    ranks on every node, as on a homogeneous partition.
    """
    environ = os.environ if environ is None else environ
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("DS_TRAINER_SLURM_MODE=node outside a Slurm step: no SLURM_STEP_NODELIST")
    hosts = hostnames(nodelist)
    task = slurm_task(environ, resolve_master=False)
    master = environ.get("MASTER_ADDR", hosts[0])
    ids = ".".join(environ.get(k, "0") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NODEID"))
    hostfile = Path(environ.get("TMPDIR") or "/tmp") / f"ds_trainer-{ids}.hostfile"
    hostfile.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
    return [
        "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(task.node_rank),
        "--master_addr", master, "--master_port", str(task.master_port),
    ]  # fmt: skip


def export_slurm_env(environ: dict[str, str] | None = None) -> SlurmTask | None:
    """In a multi-task srun step without launcher variables, export them from Slurm's; else None."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    if "RANK" in environ or not in_slurm_task(environ):
        return None
    task = slurm_task(environ)
    environ.update(task.torch_env())
    log.info(
        "Slurm task %d of %d (local rank %d) on node %s; rendezvous at %s:%d",
        task.rank, task.world_size, task.local_rank, task.node_name, task.master_addr, task.master_port,
    )  # fmt: skip
    return task


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
    return read_env()


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
