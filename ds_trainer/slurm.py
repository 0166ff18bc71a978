"""A task of a multi-task Slurm job step: its place in the job from SLURM_* variables, node lists, ports.

`srun launch.sh ...` starts one task per GPU or CPU rank with SLURM_PROCID/SLURM_LOCALID/
SLURM_STEP_NUM_TASKS/SLURM_STEP_NODELIST; `export_slurm_env` maps them onto the launcher variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that `distributed.init_distributed` reads.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ds_trainer.errors import ConfigError

log = logging.getLogger(__name__)


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
