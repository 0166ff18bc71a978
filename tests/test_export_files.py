"""An export's files: one mode for all of them, and no temporary outlives the export that wrote it.

The unit tests use directories made here; the others export a real one-epoch checkpoint of the
tiny CLIP, in this process and (to SIGKILL it mid-write) in a subprocess.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, launch_env, write_config

from ds_trainer import cli, export_files


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)) or ".": stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    previous = os.umask(0o022)
    os.umask(previous)
    yield set_umask
    os.umask(previous)


# ------------------------------------------------------------------ unit: temporaries and modes


@pytest.mark.unit
def test_only_temporaries_of_dead_processes_on_this_host_are_stale(tmp_path):
    out = tmp_path / "exported"
    host, dead = export_files.host_name(), dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".exported.tmp-{dead}": True,  # the name before hosts were recorded
            f".exported.tmp-{host}-{dead}": True,
            f".exported.old-{host}-{dead}": True,  # killed between renaming the old export and removing it
            f".exported.tmp-{host}-{live.pid}": False,  # an export running now
            f".exported.tmp-otherhost-{dead}": False,  # another machine on a shared filesystem
            f".exported2.tmp-{host}-{dead}": False,  # another export's
            "exported": False,
        }
        for name in names:
            (tmp_path / name).mkdir()
        stale = export_files.stale_temporaries(out)
        assert sorted(p.name for p in stale) == sorted(n for n, is_stale in names.items() if is_stale)
        tmp = export_files.staging_dir(out)
        assert tmp.name == f".exported.tmp-{host}-{os.getpid()}" and tmp.is_dir()
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {n for n, is_stale in names.items() if not is_stale} | {tmp.name}
    finally:
        live.kill()
        live.wait()


@pytest.mark.unit
@pytest.mark.parametrize(
    "mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_every_file_gets_one_mode_from_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert export_files.umask() == mask
    root = tmp_path / "x"
    (root / "sub").mkdir(parents=True)
    for name, mode in (("model.safetensors", 0o600), ("config.json", 0o644), ("sub/tok.json", 0o755)):
        (root / name).write_text("{}")
        os.chmod(root / name, mode)
    export_files.set_modes(root)
    got = modes(root)
    assert got == {".": dir_mode, "sub": dir_mode, "model.safetensors": file_mode, "config.json": file_mode,
                   "sub/tok.json": file_mode}  # fmt: skip


# ------------------------------------------------------------------ a real export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_shards):
    tmp = tmp_path_factory.mktemp("export-files")
    cfg = write_config(tmp / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0})
    assert cli.main(["train", "--config", str(cfg)]) == 0
    return tmp / "ckpt"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_an_exports_files_all_have_the_same_mode(checkpoint, tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "exported"
    assert cli.main(["export", "--load-dir", str(checkpoint), "--out", str(out), "--no-verify"]) == 0
    got = modes(out)
    names = {n for n in got if n != "."}
    assert {"model.safetensors", "config.json", "head.safetensors", "ds_trainer_export.json"} <= names
    expected_file, expected_dir = 0o666 & ~mask, 0o777 & ~mask
    assert {n: m for n, m in got.items() if (out / n).is_file() and m != expected_file} == {}
    assert got["."] == expected_dir
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temporary left beside it


def test_a_temporary_left_by_a_dead_export_is_removed_by_the_next(checkpoint, tmp_path):
    out = tmp_path / "exported"
    stale = [
        tmp_path / f".exported.tmp-{dead_pid()}",
        tmp_path / f".exported.old-{export_files.host_name()}-{dead_pid()}",
    ]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 1024)
    assert cli.main(["export", "--load-dir", str(checkpoint), "--out", str(out), "--no-verify"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


def test_sigkill_during_export_leaves_a_temporary_that_the_next_export_removes(checkpoint, tmp_path):
    out = tmp_path / "exported"
    # Slow the write down so the kill lands inside it: the tower's save_pretrained sleeps first.
    slow = (
        "import sys, time, transformers\n"
        "orig = transformers.PreTrainedModel.save_pretrained\n"
        "def slow(self, *a, **k):\n"
        "    orig(self, *a, **k)\n"
        "    print('written', flush=True)\n"
        "    time.sleep(60)\n"
        "transformers.PreTrainedModel.save_pretrained = slow\n"
        "from ds_trainer.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["export", "--load-dir", str(checkpoint), "--out", str(out), "--no-verify"]
    proc = subprocess.Popen([sys.executable, "-c", slow, *argv], cwd=REPO, env=launch_env(DS_ACCELERATOR="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert any(line.strip() == "written" for line in proc.stdout)  # other lines may come first
        temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(".exported.tmp-")]
        assert len(temporaries) == 1 and any(temporaries[0].iterdir())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert temporaries[0].is_dir() and not out.exists()  # what SIGKILL leaves: nothing can clean up
    start = time.monotonic()
    assert cli.main(["export", "--load-dir", str(checkpoint), "--out", str(out), "--no-verify"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]
    assert time.monotonic() - start < 120
