"""Signals: workers end with their parent, and SIGTERM or Ctrl-C ends a command in one line, no traceback.

Real `ds-trainer shard --workers 2` processes, slowed down (each image takes 0.5 s) so the signal
lands while both workers write; and the real deepspeed launcher through `ds_trainer.launcher`,
running a stand-in rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, launch_env, write_config

from ds_trainer import cli
from ds_trainer.launcher import INTERRUPTED, LAUNCHED_ENV

SLOW_SHARD = """
import os, sys, time
from pathlib import Path
from ds_trainer.data import shard_write
marks, real = Path(sys.argv[1]), shard_write.verify_image
def slow(data, decode=True):
    (marks / str(os.getpid())).touch()  # which processes are writing
    time.sleep(0.5)
    return real(data, decode)
shard_write.verify_image = slow
from ds_trainer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def start_shard(tmp_path: Path, make_tree) -> tuple[subprocess.Popen, Path, list[int]]:
    src = make_tree(tmp_path / "src", {"adm": {"train": (12, 12)}, "glide": {"train": (12, 12)}})
    marks = tmp_path / "marks"
    marks.mkdir()
    argv = ["shard", "--src", str(src), "--out", str(tmp_path / "out"), "--max-count", "3", "--workers", "2",
            "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SHARD, str(marks), *argv],
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A terminal's foreground job has Ctrl-C's default handling; a job started in the background by
        # a non-interactive shell (a CI script's `cmd &`) inherits SIGINT ignored, and Python then keeps
        # it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip: its own group, as a terminal's foreground job
    assert wait_for(lambda: len(list(marks.iterdir())) >= 2), "the two workers never started writing"
    workers = [int(p.name) for p in marks.iterdir()]
    assert proc.pid not in workers and all(running(pid) for pid in workers)
    return proc, marks, workers


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """Exit code and output; communicate() returns only once every holder of the pipes has closed them."""
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the pipes stayed open: a worker outlived the command")
    return proc.returncode, out, err


def test_sigterm_to_shard_stops_every_worker_and_closes_the_pipe(tmp_path, make_tree):
    proc, _, workers = start_shard(tmp_path, make_tree)
    os.kill(proc.pid, signal.SIGTERM)  # to the parent alone, as `kill PID` or a scheduler does
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "ds-trainer shard: SIGTERM received, stopped"
    assert wait_for(lambda: not any(running(pid) for pid in workers), 10)
    # Re-running resumes: shards the workers had finished are kept, the abandoned .tmp is redone.
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_ctrl_c_to_shard_is_one_line_exit_130_and_no_worker_survives(tmp_path, make_tree):
    proc, _, workers = start_shard(tmp_path, make_tree)
    os.killpg(proc.pid, signal.SIGINT)  # the whole group, as the terminal does on Ctrl-C
    code, _, err = finish(proc)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] == ["ds-trainer shard: interrupted"]
    assert wait_for(lambda: not any(running(pid) for pid in workers), 10)


def test_sigkill_of_the_parent_takes_its_workers_along(tmp_path, make_tree):
    proc, _, workers = start_shard(tmp_path, make_tree)
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: the kernel's parent-death signal does it
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL
    assert wait_for(lambda: not any(running(pid) for pid in workers), 10)


@pytest.mark.unit
@pytest.mark.parametrize("launched, expected", [(None, ["ds-trainer train: interrupted"]), ("1", [])])
def test_a_rank_under_the_launcher_leaves_the_ctrl_c_line_to_it(monkeypatch, capsys, launched, expected):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "train", interrupted)
    if launched is None:
        monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    else:
        monkeypatch.setenv(LAUNCHED_ENV, launched)
    assert cli.main(["train", "--config", "x.yaml"]) == 130
    assert capsys.readouterr().err.splitlines() == expected


STAND_IN_RANK = """
import os, sys, time
from pathlib import Path
out = Path(sys.argv[-1])  # after the launcher's --local_rank
(out / f"rank-{os.environ['RANK']}").write_text(os.environ.get('DS_TRAINER_LAUNCHED', ''))
try:
    time.sleep(120)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_under_the_deepspeed_launcher_is_one_line_and_exit_130(tmp_path):
    rank = tmp_path / "rank.py"
    rank.write_text(STAND_IN_RANK)
    port = str(29500 + os.getpid() % 1000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ds_trainer.launcher", "--num_gpus", "2", "--master_port", port, str(rank),
         str(tmp_path)],
        cwd=REPO, env=launch_env(DS_ACCELERATOR="cpu"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_for(lambda: len(list(tmp_path.glob("rank-*"))) == 2, 120), "the ranks never started"
        assert {p.read_text() for p in tmp_path.glob("rank-*")} == {"1"}  # ranks know the launcher speaks
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            print(proc.communicate())
    assert proc.returncode == 130, err
    assert "Traceback" not in err + out and "KeyboardInterrupt" not in err + out
    assert err.count(INTERRUPTED) == 1
    # The one line: the launcher's own INFO chatter ("Killing subprocess ...") stays off the console.
    assert [line for line in (out + err).splitlines() if "Unable to find hostfile" not in line] == [INTERRUPTED]


# make test-slow: the launcher's Ctrl-C is in make test with stand-in ranks (above); this is with real ones
@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_to_a_real_two_rank_launch_is_one_line_and_exit_130(tmp_path, tiny_shards):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 40, "warmup_epochs": 0},
                       logging={"log_every_n_steps": 1})  # fmt: skip
    proc = subprocess.Popen(["./launch.sh", "--config", str(cfg)], cwd=REPO, env=launch_env(DS_TRAINER_CPU_RANKS="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    steps = tmp_path / "run" / "steps.jsonl"
    try:
        assert wait_for(lambda: steps.is_file() and len(steps.read_text().splitlines()) >= 3, 300)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: launcher, launch and both ranks
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert [line for line in out.splitlines() if "interrupt" in line.lower()] == [INTERRUPTED]
    assert out.strip().splitlines()[-1] == INTERRUPTED


RANK_WITH_LOADER_WORKERS = """
import signal, sys, time
import torch
from ds_trainer import cli
class Slow(torch.utils.data.Dataset):
    def __len__(self): return 10**6
    def __getitem__(self, i):
        time.sleep(0.05)
        return i
signal.signal(signal.SIGINT, cli.interrupt_once)
signal.signal(signal.SIGTERM, lambda *a: None)  # a training rank's preemption handler only notes a SIGTERM
it = iter(torch.utils.data.DataLoader(Slow(), num_workers=2, batch_size=2))
try:
    while True:
        next(it)
        print("step", flush=True)
except KeyboardInterrupt:
    time.sleep(2)  # the rank's clean-up, during which the launcher's SIGTERMs reach the workers
    del it  # the loader's shutdown, where CI saw the traceback
    sys.exit(130)
"""


def test_a_ranks_ctrl_c_is_quiet_when_the_launcher_sigterms_its_loader_workers(tmp_path):
    # What deepspeed's launch.py does on Ctrl-C: SIGTERM to every process under each rank
    # (terminate_process_tree), while the rank is already stopping on the terminal's SIGINT.
    script = tmp_path / "rank.py"
    script.write_text(RANK_WITH_LOADER_WORKERS)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() == "step\n"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        for worker in workers:
            worker.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "killed by signal" not in err, err


SIGINT_BESIDE_SIGCHLD = """
import signal, sys, threading
from ds_trainer import cli
signal.signal(signal.SIGCHLD, lambda *a: None)  # torch's loader handler, a Python one
signal.signal(signal.SIGINT, cli.interrupt_once)
both = {signal.SIGINT, signal.SIGCHLD}
signal.pthread_sigmask(signal.SIG_BLOCK, both)
for signum in sorted(both):  # to this thread, so both stay pending here (other threads may not block them)
    signal.pthread_kill(threading.get_ident(), signum)
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # both noted at once
    for _ in range(1000):  # Python runs the noted handlers here: SIGINT's first, then SIGCHLD's
        pass
except KeyboardInterrupt:
    signal.signal(signal.SIGUSR1, lambda *a: None)  # any later signal makes Python look at the noted ones
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
    for _ in range(1000):
        pass
    sys.exit(130)
"""


def test_a_sigchld_arriving_with_the_ctrl_c_prints_nothing(tmp_path):
    # CI's traceback: "OSError: Signal 17 ignored due to race condition", a SIGCHLD noted for torch's
    # handler that interrupt_once had replaced with SIG_DFL before Python ran it.
    script = tmp_path / "rank.py"
    script.write_text(SIGINT_BESIDE_SIGCHLD)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert done.stderr == "", done.stderr
