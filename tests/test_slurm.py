"""Slurm: the env mapping as units, launch.sh's choice of mode, and real jobs on a two-node local cluster.

The cluster tests start slurmctld and two slurmd "nodes" (n1, n2) on this host with
scripts/slurm/local_cluster.sh (about 2 s) and skip, saying why, where Slurm is not installed or
not startable. n1/n2 do not resolve here, so jobs rendezvous at MASTER_ADDR=127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, launch_env, write_config

from ds_trainer import distributed, slurm
from ds_trainer.distributed import read_env
from ds_trainer.errors import ConfigError
from ds_trainer.slurm import (
    expand_nodelist,
    expand_tasks_per_node,
    export_slurm_env,
    in_slurm_task,
    slurm_node_launcher_args,
    slurm_task,
)

CLUSTER = REPO / "scripts" / "slurm" / "local_cluster.sh"
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"

# What rank 1 of `srun -N 2 --ntasks-per-node 1` sees (copied from a job on the local cluster).
STEP_ENV = {
    "SLURM_JOB_ID": "3", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2",
    "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODELIST": "n[1-2]",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURMD_NODENAME": "n2",
    "SLURM_CPUS_ON_NODE": "1",
}  # fmt: skip
# What the batch script of the same job sees: no step, but PROCID 0 and the allocation's 2 tasks.
BATCH_ENV = {k: v for k, v in STEP_ENV.items() if not k.startswith("SLURM_STEP")} | {
    "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURMD_NODENAME": "n1",
}  # fmt: skip


# ------------------------------------------------------------------------------------ mapping units


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n[1-2]", ["n1", "n2"]),
        ("node01,node02", ["node01", "node02"]),
        ("gpu-[01-03,07]", ["gpu-01", "gpu-02", "gpu-03", "gpu-07"]),
        ("single", ["single"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("a,b[08-10],c", ["a", "b08", "b09", "b10", "c"]),
        ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ],
)
def test_nodelist_forms_expand_like_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    if shutil.which("scontrol"):  # the same answer as Slurm's own parser, where it is installed
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=False, capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0:
            assert out.stdout.split() == hosts


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["n[1-2", "n]1[", "n[a-b]", "n[3-1]", "n[[1-2]]", "", " , "])
def test_unparsable_nodelist_is_a_config_error_naming_it(bad):
    with pytest.raises(ConfigError) as err:
        expand_nodelist(bad)
    assert repr(bad) in str(err.value)


@pytest.mark.unit
def test_tasks_per_node_expands_repeats():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ConfigError, match="2x3"):
        expand_tasks_per_node("2x3")


@pytest.mark.unit
def test_only_a_multi_task_srun_step_is_a_slurm_task():
    assert in_slurm_task(STEP_ENV)
    assert not in_slurm_task(BATCH_ENV)  # sbatch's script: PROCID 0 of NTASKS 2, but no step
    assert not in_slurm_task(STEP_ENV | {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"})  # srun --pty bash
    assert not in_slurm_task({})


@pytest.mark.unit
def test_step_env_maps_to_rank_world_and_rendezvous(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # no scontrol: Python's parse
    task = slurm_task(STEP_ENV | {"SLURM_STEP_NODELIST": "gpu-[07-08]", "SLURM_JOB_ID": "123456"})
    assert (task.rank, task.local_rank, task.world_size, task.node_rank, task.num_nodes) == (1, 0, 2, 1, 2)
    assert (task.master_addr, task.master_port, task.node_name) == ("gpu-07", 12000 + 123456 % 20000, "n2")
    env = task.torch_env()
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "1"
    # Given ones win: a cluster whose node names do not resolve, a site's own port.
    task = slurm_task(STEP_ENV | {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242"})
    assert (task.master_addr, task.master_port) == ("10.0.0.1", 4242)
    # 8 tasks on 2 nodes, this one the 6th: local rank and local world from the step's layout.
    task = slurm_task(STEP_ENV | {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "6",
                                  "SLURM_STEP_TASKS_PER_NODE": "4,2"})  # fmt: skip
    assert (task.rank, task.local_rank, task.world_size, task.local_world_size) == (5, 1, 6, 2)


def test_malformed_slurm_variables_are_config_errors():
    with pytest.raises(ConfigError, match="SLURM_PROCID='x'"):
        slurm_task(STEP_ENV | {"SLURM_PROCID": "x"})
    no_nodes = {k: v for k, v in STEP_ENV.items() if "NODELIST" not in k}
    with pytest.raises(ConfigError, match="NODELIST"):
        slurm_task(no_nodes)


@pytest.mark.unit
def test_launcher_variables_take_precedence_over_slurm():
    env = STEP_ENV | {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    assert read_env(env) == distributed.DistEnv(rank=3, local_rank=1, world_size=4)
    assert export_slurm_env(dict(env)) is None
    assert read_env(STEP_ENV) == distributed.DistEnv(rank=1, local_rank=0, world_size=2)
    assert read_env(BATCH_ENV) == distributed.DistEnv(rank=0, local_rank=0, world_size=1)


@pytest.mark.unit
def test_export_fills_in_what_deepspeed_reads():
    env = dict(STEP_ENV, MASTER_ADDR="127.0.0.1")
    task = export_slurm_env(env)
    assert task is not None
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12003",
    }  # fmt: skip
    assert export_slurm_env(dict(BATCH_ENV)) is None


@pytest.mark.unit
def test_node_mode_writes_a_hostfile_and_numbers_this_node(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    env = STEP_ENV | {"TMPDIR": str(tmp_path), "SLURM_STEP_NODELIST": "gpu-[01-02]"}
    args = slurm_node_launcher_args(4, env)
    hostfile = Path(args[args.index("--hostfile") + 1])
    assert hostfile.read_text() == "gpu-01 slots=4\ngpu-02 slots=4\n"
    assert args[args.index("--node_rank") + 1] == "1" and "--no_ssh" in args
    assert args[args.index("--master_addr") + 1] == "gpu-01"
    assert args[args.index("--master_port") + 1] == "12003"


# ---------------------------------------------------------------- launch.sh's mode, with a stub Python


@pytest.fixture
def stub_python(tmp_path) -> Path:
    """An interpreter that runs `-c` snippets for real but only prints what `-m MODULE` it would exec."""
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\necho "EXEC $*"\n')
    stub.chmod(0o755)
    return stub


def _launch(stub: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in launch_env().items() if not k.startswith("SLURM") and k != "DS_LAUNCHER_ARGS"}
    clean.update(DS_TRAINER_PYTHON=str(stub), DS_TRAINER_CPU_RANKS="2", MASTER_PORT="23456", **env)
    cmd = [str(REPO / "launch.sh"), *args]
    return subprocess.run(cmd, check=False, cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)


def test_launch_sh_in_an_sbatch_script_without_srun_starts_the_launcher(stub_python):
    out = _launch(stub_python, ["--config", "c.yaml"], **BATCH_ENV)
    assert out.returncode == 0, out.stderr
    assert (
        f"EXEC -m ds_trainer.launcher --num_gpus 2 --master_port 23456 {REPO}/launch.sh --config c.yaml" in out.stdout
    )


def test_launch_sh_in_an_srun_task_is_that_rank(stub_python):
    out = _launch(stub_python, ["--config", "c.yaml"], **STEP_ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "EXEC -m ds_trainer train --config c.yaml"
    assert "Slurm task 1 of 2 on node n2" in out.stderr
    out = _launch(stub_python, ["--no_ssh", "--", "--config", "c.yaml"], **STEP_ENV)
    assert out.returncode == 2 and "make no sense in an srun task" in out.stderr


def test_launch_sh_passes_launcher_args_before_a_double_dash(stub_python, tmp_path):
    hostfile = tmp_path / "hostfile"
    args = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1", "--", "--config", "c.yaml"]
    out = _launch(stub_python, args, DS_LAUNCHER_ARGS="--master_addr 127.0.0.1")
    assert out.returncode == 0, out.stderr
    # A hostfile sizes the job: no --num_gpus to override its slots.
    assert out.stdout.strip() == (
        f"EXEC -m ds_trainer.launcher --master_port 23456 --master_addr 127.0.0.1 --hostfile {hostfile} "
        f"--no_ssh --node_rank 1 {REPO}/launch.sh --config c.yaml"
    )


def test_launch_sh_node_mode_starts_one_launcher_per_node(stub_python, tmp_path):
    env = STEP_ENV | {"DS_TRAINER_SLURM_MODE": "node", "TMPDIR": str(tmp_path), "MASTER_ADDR": "127.0.0.1"}
    out = _launch(stub_python, ["--config", "c.yaml"], **env)
    assert out.returncode == 0, out.stderr
    hostfile = tmp_path / "ds_trainer-3.0.1.hostfile"
    assert hostfile.read_text() == "n1 slots=2\nn2 slots=2\n"
    assert out.stdout.strip() == (
        f"EXEC -m ds_trainer.launcher --master_port 23456 --hostfile {hostfile} --no_ssh --node_rank 1 "
        f"--master_addr 127.0.0.1 --master_port 23456 {REPO}/launch.sh --config c.yaml"  # MASTER_PORT given
    )
    out = _launch(stub_python, ["--config", "c.yaml"], **(env | {"DS_TRAINER_SLURM_MODE": "bogus"}))
    assert out.returncode == 2 and "task or node" in out.stderr


# ------------------------------------------------------------------------------- a real local cluster


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        # n1/n2 do not resolve on this host: rendezvous on loopback (MASTER_PORT still from the job id).
        return launch_env(SLURM_CONF=str(self.conf), HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", **extra)

    def run(self, args: list[str], timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, check=False, cwd=REPO, env=self.env(**extra), capture_output=True, text=True, timeout=timeout
        )

    def logs(self, lines: int = 15) -> str:
        """The daemons' last log lines, for a failure message."""
        tails = [f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
                 for f in sorted((self.root / "log").glob("*.log"))]  # fmt: skip
        return "\n".join(tails)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the job has left the controller)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], timeout=30)
        return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f) if out.returncode == 0 else {}


@pytest.fixture(scope="session")
def slurm_cluster():
    """Two slurmd nodes n1, n2 on this host; stopped and removed after the session."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol") if not shutil.which(b)]
    if missing:
        pytest.skip(f"Slurm not installed (missing {', '.join(missing)}): apt-get install slurmctld slurmd "
                    "slurm-client munge, as .ci/run does when root")  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd starts jobs as their submitter)")
    root = Path(tempfile.mkdtemp(prefix="ds-slurm-", dir="/tmp"))  # short: the munge socket path is limited
    start = subprocess.run([str(CLUSTER), "start", str(root)], check=False, capture_output=True, text=True, timeout=120)
    try:
        if start.returncode != 0:
            pytest.skip(f"local Slurm cluster did not start (exit {start.returncode}): {start.stderr[-1500:]}")
        yield Cluster(root)
    finally:
        subprocess.run([str(CLUSTER), "stop", str(root)], check=False, capture_output=True, text=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_node_sbatch_job_trains_one_rank_per_node(slurm_cluster, tiny_shards, tmp_path):
    work = Path(tempfile.mkdtemp(prefix="job-", dir=slurm_cluster.root))  # slurmd (root) writes the output here
    cfg = write_config(work / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0})
    out = slurm_cluster.run(
        ["sbatch", "--wait", "-N", "2", "--ntasks-per-node", "1", "-c", "1", "-o", f"{work}/job-%j.out",
         str(SBATCH), "--config", str(cfg)],
    )  # fmt: skip
    (log_file,) = work.glob("job-*.out")
    log = log_file.read_text()
    assert out.returncode == 0, out.stdout + out.stderr + log[-4000:] + slurm_cluster.logs()
    job_id = log_file.stem.removeprefix("job-")
    # One task on each node, each its own rank, meeting at the port the job id gives.
    assert "launch.sh: Slurm task 0 of 2 on node n1" in log and "launch.sh: Slurm task 1 of 2 on node n2" in log
    port = 12000 + int(job_id) % 20000
    assert f"Slurm task 1 of 2 (local rank 0) on node n2; rendezvous at 127.0.0.1:{port}" in log
    (row,) = _rows(work / "run")
    assert row["epoch"] == 1 and row["step"] == 8 and row["val_samples"] == 48  # 128 / (2 ranks x 8)
    assert json.loads((work / "run" / "ds_config.json").read_text())["train_batch_size"] == 8 * 2
    state = json.loads((work / "ckpt" / "epoch_1" / "ds_trainer.json").read_text())
    assert (state["world_size"], state["global_step"]) == (2, 8)
    assert "resuming from" not in log


# make test-slow, with the two-node job: a real Slurm (its daemons start once per module); the sbatch
# script's and launch.sh's Slurm logic is unit-tested above in make test.
@pytest.mark.distributed
@pytest.mark.slow
def test_exit_75_requeues_the_job_which_resumes_from_the_checkpoint(slurm_cluster, tmp_path):
    """train.sbatch's half of preemption, with a stand-in launch.sh: exit 75 -> requeue -> --load-dir."""
    work = Path(tempfile.mkdtemp(prefix="requeue-", dir=slurm_cluster.root))
    home = work / "home"
    home.mkdir()
    # Like the trainer: rank 0 writes PREEMPTED after the checkpoint and exits 75 at once; rank 1 is
    # slower, so srun's --kill-on-bad-exit ends it (exit 143): the marker, not srun's code, decides.
    (home / "launch.sh").write_text(
        '#!/bin/sh\necho "stand-in task $SLURM_PROCID restart ${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME: $*"\n'
        'mkdir -p "$CKPT/epoch_1" && echo {} > "$CKPT/epoch_1/ds_trainer.json"\n'
        '[ -z "${SLURM_RESTART_COUNT:-}" ] || exit 0\n'
        'if [ "$SLURM_PROCID" = 0 ]; then echo {} > "$CKPT/PREEMPTED"; sleep 2; exit 75; fi\n'  # (lets srun relay the echo)
        'sleep 20; exit 75\n'
    )  # fmt: skip
    (home / "launch.sh").chmod(0o755)
    ckpt = work / "ckpt"
    cfg = write_config(work / "cfg.yaml", work / "shards")  # checkpoint_dir: work/ckpt (never read here)
    submit = slurm_cluster.run(
        ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node", "1", "-c", "1", "-o", f"{work}/job.out",
         str(SBATCH), "--config", str(cfg)],
        timeout=60, DS_TRAINER_HOME=str(home), CKPT=str(ckpt),
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    final = _wait_for_job(slurm_cluster, job_id, timeout=120)
    log = (work / "job.out").read_text()
    assert final.get("JobState") == "COMPLETED" and final.get("ExitCode") == "0:0", (
        f"{final}\n{log}\n{slurm_cluster.logs()}"
    )
    assert final.get("Restarts") == "1", final
    first, second = log.split("requeueing job")
    assert "stand-in task 0 restart 0 on n1: --config" in first and "--load-dir" not in first
    assert f"stand-in task 1 restart 1 on n2: --config {cfg} --load-dir {ckpt}" in second
    assert f"resuming from {ckpt}" in second


def _wait_for_job(cluster: Cluster, job_id: str, timeout: float) -> dict[str, str]:
    """Poll (more often than sbatch --wait, which backs off to 32 s) until the job ends.

    A requeued job may start again once its old credential expires: cred_expire=10 s on the local cluster.
    """
    deadline, last = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        info = cluster.job(job_id)
        if not info:
            return last
        last = info
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    cluster.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {last}")
