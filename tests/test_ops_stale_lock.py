"""A build lock left by a killed op build is cleared and the op loads; a live builder is waited for, and named.

The end-to-end tests copy this environment's built `deepspeed_shm_comm` op (1 MB, compiled by
`make ops`) into a fresh TORCH_EXTENSIONS_DIR and load it through DeepSpeed's own builder in a
subprocess, as a rank does: nothing is compiled, so each takes seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, launch_env

from ds_trainer import ops

OP = "deepspeed_shm_comm"
LOAD_OP = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
import ds_trainer
from ds_trainer.ops import install_build_guard
assert install_build_guard()
from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
print("loaded", ShareMemCommBuilder().load().__name__, flush=True)
"""
HOLD_OPEN = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)  # as torch's FileBaton holds its lock while it builds
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def extensions(tmp_path) -> Path:
    built = ops.extensions_dir() / OP
    if not (built / f"{OP}.so").is_file():
        pytest.skip(f"{OP} is not built in {built.parent} (run `make ops`)")
    root = tmp_path / "torch_extensions"
    shutil.copytree(built, root / OP, ignore=shutil.ignore_patterns(ops.LOCK_NAME, "lock"))  # mtimes kept
    return root


def load(extensions: Path, **popen) -> subprocess.Popen:
    env = launch_env(TORCH_EXTENSIONS_DIR=str(extensions), DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-c", LOAD_OP], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)  # fmt: skip


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("left", ["torch lock", "both locks"])
def test_a_lock_left_by_a_killed_build_is_cleared_and_the_op_loads(extensions, left):
    build = extensions / OP
    (build / "lock").touch()  # torch's FileBaton: without the guard, every later load waits forever
    if left == "both locks":  # ours too, naming a builder that is gone (a flock dies with its holder)
        (build / ops.LOCK_NAME).write_text(f'{{"pid": {dead_pid()}, "host": "x", "state": "building"}}')
    proc = load(extensions)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == f"loaded {OP}"
    assert not (build / "lock").exists()
    assert f"removed a stale op build lock (its build was killed 0 min ago): {build / 'lock'}" in err
    assert "building DeepSpeed's" not in err  # the copied build was reused, not compiled again


def test_a_live_builder_is_waited_for_with_one_line_naming_the_lock(extensions):
    lock = extensions / OP / "lock"
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        proc = load(extensions)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not any("waiting for another process's op build lock" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-2000:]
            time.sleep(0.2)
        said = [line for line in lines if "waiting for" in line]
        assert len(said) == 1 and str(lock) in said[0] and f"pid {holder.pid}" in said[0]
        assert proc.poll() is None and lock.exists()  # a live builder's lock is not stolen
        holder.kill()
        holder.wait()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read().strip().splitlines()[-1] == f"loaded {OP}"
        reader.join(timeout=10)
        assert len([line for line in lines if "waiting for" in line]) == 1  # said once, not every poll
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ without /proc, only the lock's age tells


@pytest.mark.unit
def test_without_proc_an_old_lock_is_stale_and_a_young_one_is_waited_for(tmp_path, monkeypatch, ops_log):
    monkeypatch.setattr(ops, "live_builders", lambda build_dir, lock: None)
    build = tmp_path / "op"
    build.mkdir()
    lock = build / "lock"
    lock.touch()
    old = time.time() - ops.STALE_S - 60
    os.utime(lock, (old, old))
    ops.clear_dead_torch_lock(build, logging.INFO)
    assert not lock.exists()

    lock.touch()  # young: perhaps a build on a host this one cannot see into
    waiter = threading.Thread(target=ops.clear_dead_torch_lock, args=(build, logging.INFO, 0.2))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and lock.exists()
    said = [r.getMessage() for r in ops_log if "waiting for" in r.getMessage()]
    assert len(said) == 1 and str(lock) in said[0] and "no /proc here to tell which" in said[0]
    lock.unlink()  # the builder finished
    waiter.join(timeout=5)
    assert not waiter.is_alive()
