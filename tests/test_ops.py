"""DeepSpeed's ops: one directory and one ninja per environment, a lock that cannot go stale, a build that says so.

The pure parts run on fake environments and toy ninja files; the last test launches a 1-step
run twice through the real launcher, with and without the venv's bin on PATH, and checks that
the second launch compiles nothing.
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
import yaml
from conftest import REPO, launch_env

from ds_trainer import ops


def messages(records, level=logging.INFO):
    return [r.getMessage() for r in records if r.levelno >= level]


# ------------------------------------------------------------------ where and with which ninja


def test_each_environment_gets_its_own_op_directory(tmp_path):
    venv_a, venv_b = tmp_path / "a" / ".venv", tmp_path / "b" / ".venv"
    venv_a.mkdir(parents=True)
    venv_b.mkdir(parents=True)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert ops.default_extensions_dir(str(venv_a), "/usr", env) == venv_a / "torch_extensions"
    assert ops.default_extensions_dir(str(venv_b), "/usr", env) == venv_b / "torch_extensions"
    # A checkout's .venv linked to another's: its builds name the linked paths, so not the real venv's directory.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".venv").symlink_to(venv_a)
    linked = ops.default_extensions_dir(str(tmp_path / "c" / ".venv"), "/usr", env)
    assert linked.parent == tmp_path / "cache" / "ds_trainer" / "torch_extensions"
    assert linked != venv_a / "torch_extensions"
    # Not a venv (system or conda Python): a directory of its own under the cache, stable per prefix.
    system = ops.default_extensions_dir("/opt/py", "/opt/py", env)
    assert system.parent == linked.parent and system != linked
    assert system == ops.default_extensions_dir("/opt/py", "/opt/py", env)


def test_pin_puts_the_environments_ninja_first_and_keeps_the_users_directory(tmp_path):
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    ninja = venv / "bin" / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    python = str(venv / "bin" / "python")

    env = {"PATH": f"/usr/bin:{venv / 'bin'}:/bin"}
    ops.pin_build_env(env, executable=python, prefix=str(venv), base_prefix="/usr")
    assert env["PATH"] == f"{venv / 'bin'}:/usr/bin:/bin"
    assert env["TORCH_EXTENSIONS_DIR"] == str(venv / "torch_extensions")
    ops.pin_build_env(env, executable=python, prefix=str(venv), base_prefix="/usr")  # idempotent
    assert env["PATH"] == f"{venv / 'bin'}:/usr/bin:/bin"

    mine = {"PATH": "/usr/bin", "TORCH_EXTENSIONS_DIR": "/data/ext"}
    ops.pin_build_env(mine, executable=python, prefix=str(venv), base_prefix="/usr")
    assert mine["TORCH_EXTENSIONS_DIR"] == "/data/ext"

    ninja.unlink()  # no ninja of its own: PATH is left as the user has it
    bare = {"PATH": "/usr/bin"}
    ops.pin_build_env(bare, executable=python, prefix=str(venv), base_prefix="/usr")
    assert bare["PATH"] == "/usr/bin"


def test_importing_ds_trainer_pins_the_build_environment():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["PATH"] = "/usr/bin:/bin"
    env["PYTHONPATH"] = str(REPO)
    probe = "import os, ds_trainer; print(os.environ['TORCH_EXTENSIONS_DIR']); print(os.environ['PATH'])"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    ext_dir, path = out.stdout.splitlines()[-2:]
    assert ext_dir == str(ops.default_extensions_dir())
    if os.access(Path(sys.executable).parent / "ninja", os.X_OK):
        assert path.split(os.pathsep)[0] == os.path.dirname(os.path.abspath(sys.executable))


def toy_build(tmp_path: Path) -> Path:
    build = tmp_path / "op"
    build.mkdir()
    (build / "src.txt").write_text("x")
    (build / "build.ninja").write_text("rule cp\n  command = cp $in $out\nbuild out.txt: cp src.txt\n")
    return build


@pytest.mark.skipif(shutil.which("ninja") is None, reason="no ninja")
def test_needs_build_is_ninjas_own_dry_run(tmp_path):
    build = toy_build(tmp_path)
    assert ops.needs_build(tmp_path / "never-built")
    assert ops.needs_build(build)
    subprocess.run(["ninja", "-C", str(build)], check=True, capture_output=True)
    assert not ops.needs_build(build)
    time.sleep(0.01)
    os.utime(build / "src.txt", (time.time() + 5, time.time() + 5))  # a newer source
    assert ops.needs_build(build)


# ------------------------------------------------------------------ locks


def test_a_lock_left_by_a_killed_build_is_removed_at_once(tmp_path, ops_log):
    build = tmp_path / "fused_adam"
    build.mkdir()
    (build / "lock").touch()  # torch's FileBaton, never released: its builder was SIGKILLed
    start = time.monotonic()
    ops.clear_dead_torch_lock(build, logging.INFO)
    assert time.monotonic() - start < 5
    assert not (build / "lock").exists()
    assert any("removed a stale op build lock" in m for m in messages(ops_log, logging.WARNING))


HOLD_TORCH_LOCK = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
time.sleep(99)
"""


def test_a_live_builders_lock_is_waited_for_and_named_then_cleared_when_it_dies(tmp_path, ops_log):
    build = tmp_path / "cpu_adam"
    build.mkdir()
    lock = build / "lock"
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TORCH_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        waiter = threading.Thread(target=ops.clear_dead_torch_lock, args=(build, logging.INFO, 0.2))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and lock.exists()  # a live builder: wait, don't steal its lock
        assert any(f"pid {holder.pid}" in m and str(lock) in m for m in messages(ops_log))
        holder.kill()
        holder.wait()
        waiter.join(timeout=10)
        assert not waiter.is_alive()
        assert not lock.exists()
    finally:
        holder.kill()
        holder.wait()


HOLD_OUR_LOCK = """
import logging, sys, time
from pathlib import Path
from ds_trainer import ops
with ops.build_lock(Path(sys.argv[1]), "fused_adam", logging.DEBUG) as fd:
    ops.write_holder_info(fd, ops.holder_info("building", "fused_adam"))
    print("ready", flush=True)
    time.sleep(120)
"""


def test_the_build_lock_names_what_it_waits_for_and_dies_with_its_holder(tmp_path, ops_log):
    build = tmp_path / "fused_adam"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUR_LOCK, str(build)], stdout=subprocess.PIPE, text=True,
                              env=launch_env())  # fmt: skip
    got = threading.Event()

    def wait_for_lock():
        with ops.build_lock(build, "fused_adam", logging.INFO, notice_s=0.2):
            got.set()

    try:
        assert holder.stdout.readline().strip() == "ready"
        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        time.sleep(1.0)
        assert not got.is_set()
        said = [m for m in messages(ops_log) if "waiting for another process's op build lock" in m]
        assert len(said) == 1, messages(ops_log)
        assert str(build / ops.LOCK_NAME) in said[0] and f"pid {holder.pid}" in said[0]
        assert "building fused_adam" in said[0]
        holder.kill()  # SIGKILL: nothing is cleaned up, yet the kernel releases the flock
        waiter.join(timeout=10)
        assert got.is_set()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(shutil.which("ninja") is None, reason="no ninja")
def test_a_build_is_announced_once_on_rank_0_and_a_cache_hit_is_quiet(tmp_path, ops_log, monkeypatch):
    build = toy_build(tmp_path)

    def load():
        subprocess.run(["ninja", "-C", str(build)], check=True, capture_output=True)
        return "module"

    monkeypatch.setenv("RANK", "1")
    assert ops.guarded_load("toy", load, build_dir=build) == "module"
    assert messages(ops_log) == []  # rank 1 builds too, but only rank 0 speaks
    assert any("building DeepSpeed's toy op" in m for m in messages(ops_log, logging.DEBUG))

    (build / "out.txt").unlink()
    ops_log.clear()
    monkeypatch.setenv("RANK", "0")
    ops.guarded_load("toy", load, build_dir=build)
    said = messages(ops_log)
    assert len(said) == 2 and said[0].startswith("building DeepSpeed's toy op (first launch") and "built" in said[1]

    ops_log.clear()
    ops.guarded_load("toy", load, build_dir=build)  # built: nothing on the console
    assert messages(ops_log) == []


# ------------------------------------------------------------------ through the real launcher


def snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.suffix in (".o", ".so")}


# make test-slow: the pinned op directory and ninja are unit-tested above; this checks two real launches
@pytest.mark.slow
@pytest.mark.distributed
def test_a_second_launch_with_another_path_compiles_nothing(tmp_path):
    from ds_trainer.data import make_demo_shards

    shards = make_demo_shards(tmp_path / "shards", train_per_class=4, val_per_class=2, max_count=20, progress=False)
    assert shards
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"model_name": "tiny"},
        "data": {"shards": str(tmp_path / "shards"), "num_workers": 0},
        "training": {"num_epochs": 1, "batch_size": 8, "warmup_epochs": 0, "checkpoint_dir": str(tmp_path / "ckpt")},
        "logging": {"run_dir": str(tmp_path / "run")},
    }))  # fmt: skip
    ext_dir = ops.extensions_dir()
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    bare_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)

    def launch(path: str) -> str:
        env = launch_env(PATH=path, DS_TRAINER_CPU_RANKS="2")
        run = subprocess.run(["./launch.sh", "--config", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run.stdout + run.stderr

    launch(f"{venv_bin}{os.pathsep}{bare_path}")  # as from an activated venv (it builds what `make` did not)
    built = snapshot(ext_dir)
    assert built, f"no compiled op in {ext_dir}"
    console = launch(bare_path)  # as `make` runs it: the venv not on PATH
    assert snapshot(ext_dir) == built, "the second launch recompiled ops"
    assert "building DeepSpeed" not in console
    # DeepSpeed's per-rank chatter is in train.log, not on the console.
    assert "built successfully" not in console
    assert "Attempting to get learning rate" not in console
    assert "Setting accelerator to CPU" not in console
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Attempting to get learning rate" in log
