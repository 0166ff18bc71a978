"""The run's directories: a refused run touches nothing of a live one, and OS errors are one line.

A live run is played by this process: it holds the locks of a finished run's directories (as the
live run would), and a second `ds-trainer train` is started in this process against them. Every
file under both directories is hashed before and after. One end-to-end test starts a real run in
a subprocess and a second one against it while it trains.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, launch_env, write_config

from ds_trainer import cli, run_lock
from ds_trainer.errors import CheckpointError, ConfigError, DsTrainerError
from ds_trainer.run_lock import LOCK_NAME, DirLock, RunLocks
from ds_trainer.sinks import FileSink, configure_logging, write_run_config
from ds_trainer.sinks import files as sink_files


def digest(*roots: Path) -> dict[str, str]:
    """Every file under `roots` (path -> sha256): what a refused run must leave as it was."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert out, roots
    return out


def cli_run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_shards):
    """A run of one epoch (in this process): its config, run_dir and checkpoint_dir, with every file a run writes."""
    root = tmp_path_factory.mktemp("live")
    cfg = write_config(
        root / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0, "save_frequency": 1}
    )
    assert cli.main(["train", "--config", str(cfg)]) == 0
    assert (root / "run" / "steps.jsonl").read_text().count("\n") >= 4
    return root


@pytest.fixture
def live(finished_run, tmp_path):
    """A copy of the finished run whose locks this process holds, as the live run would."""
    root = tmp_path / "live"
    shutil.copytree(finished_run, root)
    text = (root / "cfg.yaml").read_text().replace(str(finished_run), str(root))
    (root / "cfg.yaml").write_text(text)
    locks = RunLocks({"training.checkpoint_dir": root / "ckpt", "logging.run_dir": root / "run"})
    locks.acquire(is_main=True, world_size=1)
    try:
        yield root
    finally:
        locks.release()


def test_resuming_the_same_command_while_it_runs_is_refused_untouched(live, capsys):
    """What a requeued Slurm job does while the old one is still alive: same command, --load-dir."""
    before = digest(live / "run", live / "ckpt")
    code, err = cli_run(["train", "--config", str(live / "cfg.yaml"), "--load-dir", str(live / "ckpt")], capsys)
    assert code == 4, err
    assert f"training.checkpoint_dir {live / 'ckpt'} is in use by a live run (host {socket.gethostname()}" in err
    assert digest(live / "run", live / "ckpt") == before  # steps.jsonl not rewound, nothing converted


def test_another_set_on_the_same_directories_is_refused_untouched(live, capsys):
    before = digest(live / "run", live / "ckpt")
    argv = ["train", "--config", str(live / "cfg.yaml"), "--set", "training.learning_rate=0.5",
            "--set", "training.num_epochs=2"]  # fmt: skip
    code, err = cli_run(argv, capsys)
    assert code == 4, err
    assert digest(live / "run", live / "ckpt") == before  # config.yaml and ds_config.json as the live run wrote them


def test_the_same_run_dir_with_another_checkpoint_dir_is_refused_untouched(live, tmp_path, capsys):
    before = digest(live / "run", live / "ckpt")
    other = tmp_path / "other_ckpt"
    code, err = cli_run(
        ["train", "--config", str(live / "cfg.yaml"), "--set", f"training.checkpoint_dir={other}"], capsys
    )
    assert code == 4, err
    assert f"logging.run_dir {live / 'run'} is in use by a live run" in err
    assert digest(live / "run", live / "ckpt") == before  # no second epoch 1 in metrics.jsonl
    assert not any(other.rglob("*"))  # its own checkpoint_dir's lock was given back


def test_the_same_checkpoint_dir_with_another_run_dir_is_refused_before_that_run_dir_exists(live, tmp_path, capsys):
    before = digest(live / "run", live / "ckpt")
    other = tmp_path / "other_run"
    code, err = cli_run(["train", "--config", str(live / "cfg.yaml"), "--set", f"logging.run_dir={other}"], capsys)
    assert code == 4, err
    assert "training.checkpoint_dir" in err and "in use by a live run" in err
    assert digest(live / "run", live / "ckpt") == before
    assert not other.exists()


def test_a_zero_shot_run_on_a_live_run_dir_is_refused_untouched(live, capsys):
    before = digest(live / "run", live / "ckpt")
    code, err = cli_run(["train", "--config", str(live / "cfg.yaml"), "--set", "model.mode=zero-shot"], capsys)
    assert code == 4, err
    assert f"logging.run_dir {live / 'run'} is in use" in err
    assert digest(live / "run", live / "ckpt") == before


def test_a_trainer_from_python_is_refused_before_its_set_up_writes(live, tiny_shards):
    from ds_trainer import Trainer
    from ds_trainer.data import make_shard_loader
    from ds_trainer.models import CLIPModel

    before = digest(live / "run", live / "ckpt")
    loader = make_shard_loader(tiny_shards, "train", batch_size=8, train=True, num_workers=0)
    trainer = Trainer(CLIPModel("tiny"), loader, None, device="cpu", num_epochs=1,
                      checkpoint_dir=str(live / "ckpt"), run_dir=live / "run")  # fmt: skip
    with pytest.raises(CheckpointError, match="in use by a live run"):
        trainer.train()
    assert trainer.engine is None  # refused before the engine was built
    assert digest(live / "run", live / "ckpt") == before


@pytest.mark.unit
def test_run_locks_lock_a_shared_directory_once_and_give_back_what_they_took(tmp_path):
    same = RunLocks({"training.checkpoint_dir": tmp_path / "d", "logging.run_dir": tmp_path / "d"})
    with same.acquire(True, 1):
        assert len(same.locks) == 1 and (tmp_path / "d" / LOCK_NAME).is_file()
    assert not (tmp_path / "d" / LOCK_NAME).exists()
    holder = DirLock(tmp_path / "run", key="logging.run_dir")
    holder.acquire()
    both = RunLocks({"training.checkpoint_dir": tmp_path / "ckpt", "logging.run_dir": tmp_path / "run"})
    with pytest.raises(CheckpointError, match=r"logging\.run_dir .* in use"):
        both.acquire(True, 1)
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()  # the first lock was given back
    assert not both.held
    holder.release()


# ------------------------------------------------------------------ what a lock file may hold
def write_lock(directory: Path, content: str, age_s: float = 0.0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_text(content)
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


@pytest.mark.unit
@pytest.mark.parametrize(
    "content",
    ['{"pid": "abc"}', "[]", '[1, 2]', '"x"', "42", '{"host": 5, "pid": 1}', '{"host": "h", "pid": -3}',
     '{"host": "h", "pid": true}', '{"host": "h"}'],
)  # fmt: skip
def test_a_lock_file_that_is_no_lock_record_is_refused_by_name(tmp_path, content):
    path = write_lock(tmp_path, content, age_s=3600)
    with pytest.raises(CheckpointError, match=rf"the lock {path} is not a ds_trainer lock .*delete it"):
        DirLock(tmp_path).acquire()
    assert path.read_text() == content  # not ours to delete


@pytest.mark.unit
@pytest.mark.parametrize("content", ["", "{", '{"host": "a", "pi', "\x00\x01garbage"])
def test_a_lock_file_cut_short_is_taken_over_once_old_and_waited_for_while_fresh(tmp_path, content, caplog,
                                                                                monkeypatch):  # fmt: skip
    path = write_lock(tmp_path, content, age_s=3600)
    with caplog.at_level("WARNING"):
        DirLock(tmp_path).acquire()
    assert "the lock file was cut short" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    # A fresh one may be a live run's, between creating and writing it: waited for, and refused once written...
    monkeypatch.setattr(run_lock, "BEING_WRITTEN_S", 2.0)
    fresh = write_lock(tmp_path / "fresh", content)
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"})
    writer = threading.Timer(0.3, fresh.write_text, args=(record,))
    writer.start()
    with pytest.raises(CheckpointError, match=rf"PID {os.getpid()}, since now"):
        DirLock(tmp_path / "fresh").acquire()
    writer.join()
    # ... or taken over once it stayed cut for BEING_WRITTEN_S (its writer died).
    monkeypatch.setattr(run_lock, "BEING_WRITTEN_S", 0.3)
    write_lock(tmp_path / "died", content)
    began = time.monotonic()
    DirLock(tmp_path / "died").acquire()
    assert time.monotonic() - began >= 0.25


@pytest.mark.unit
def test_an_unreadable_lock_or_a_directory_in_its_place_is_refused_by_name(tmp_path):
    (tmp_path / "a" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(CheckpointError, match=rf"the lock {tmp_path / 'a' / LOCK_NAME} is a directory"):
        DirLock(tmp_path / "a").acquire()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_NAME).write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="cannot be read"):
        DirLock(tmp_path / "b").acquire()


# ------------------------------------------------------------------ directories that cannot be written
@pytest.mark.unit
@pytest.mark.parametrize("key", ["training.checkpoint_dir", "logging.run_dir"])
def test_a_file_in_place_of_a_directory_or_above_it_is_a_config_error(tmp_path, key):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=rf"{key} {tmp_path / 'f'} is a file, not a directory"):
        RunLocks({key: tmp_path / "f"}).acquire(True, 1)
    with pytest.raises(
        ConfigError, match=rf"{key} {tmp_path / 'f' / 'sub'} cannot be made: {tmp_path / 'f'} is a file"
    ):
        RunLocks({key: tmp_path / "f" / "sub"}).acquire(True, 1)


@pytest.mark.unit
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_directory_the_lock_cannot_be_created_in_is_a_config_error(tmp_path, monkeypatch, code):
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", refusing)
    (tmp_path / "ro").mkdir()
    with pytest.raises(
        ConfigError, match=rf"training\.checkpoint_dir {tmp_path / 'ro'} (is not writable|has no space)"
    ):
        RunLocks({"training.checkpoint_dir": tmp_path / "ro"}).acquire(True, 1)


def make_read_only(path: Path) -> None:
    """Really read-only: a mode without write bits (as root: the immutable attribute, where allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root, and this filesystem cannot make a directory immutable")


def writable_again(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o755)
    elif shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_a_read_only_checkpoint_dir_is_refused_before_the_set_up(tmp_path, tiny_shards, capsys, monkeypatch):
    import ds_trainer.models

    def no_set_up(*args, **kwargs):
        raise AssertionError("the model was built: the check came after the set-up")

    monkeypatch.setattr(ds_trainer.models, "build_model", no_set_up)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards)
    make_read_only(tmp_path / "ckpt")
    try:
        code, err = cli_run(["train", "--config", str(cfg)], capsys)
    finally:
        writable_again(tmp_path / "ckpt")
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert f"training.checkpoint_dir {tmp_path / 'ckpt'} is not writable" in line and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # checked before the run_dir was made or written


# ------------------------------------------------------------------ a full disk in the run directory
class FillingFile:
    """A real unbuffered file that takes `budget` more bytes, then fails with ENOSPC (short write first)."""

    def __init__(self, path: Path, budget: int, code: int = errno.ENOSPC) -> None:
        self.f = path.open("ab", buffering=0)
        self.budget, self.code = budget, code

    def write(self, data) -> int:
        if self.budget <= 0:
            raise OSError(self.code, os.strerror(self.code))
        n = self.f.write(bytes(data[: self.budget]))
        self.budget -= n
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def filling(monkeypatch, budget: int, code: int = errno.ENOSPC) -> None:
    monkeypatch.setattr(FileSink, "_open", staticmethod(lambda path: FillingFile(path, budget, code)))


def whole_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n"), f"{path} ends in a cut line: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.unit
@pytest.mark.parametrize("budget", [0, 1, 25, 200])  # bytes left when the disk fills: none, mid-line, after lines
def test_steps_jsonl_never_keeps_a_cut_line_when_the_disk_fills(tmp_path, monkeypatch, budget):
    sink = FileSink(tmp_path)
    sink.step(1, {"train/loss": 0.5})
    written = (tmp_path / "steps.jsonl").read_text()
    sink.close()
    sink = FileSink(tmp_path)
    filling(monkeypatch, budget)

    def log_steps() -> None:
        for step in range(2, 100):
            sink.step(step, {"train/loss": 0.25, "train/lr": 1e-3})

    full = rf"no space left on the device of {tmp_path} while writing steps\.jsonl \(it ends at its last whole line\)"
    with pytest.raises(DsTrainerError, match=full):
        log_steps()
    rows = whole_lines(tmp_path / "steps.jsonl")
    assert (tmp_path / "steps.jsonl").read_text().startswith(written)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


@pytest.mark.unit
@pytest.mark.parametrize("budget, code, says", [
    (10, errno.ENOSPC, "no space left on the device"), (0, errno.EROFS, "Read-only file system"),
    (0, errno.EIO, "Input/output error"),
])  # fmt: skip
def test_metrics_jsonl_keeps_whole_rows_and_names_the_file(tmp_path, monkeypatch, budget, code, says):
    FileSink(tmp_path).write({"epoch": 1, "step": 8, "val_auc": 0.5})
    filling(monkeypatch, budget, code)
    with pytest.raises(DsTrainerError, match=rf"{says}.*--load-dir") as info:
        FileSink(tmp_path).write({"epoch": 2, "step": 16, "val_auc": 0.75})
    assert "metrics.jsonl" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert [r["epoch"] for r in whole_lines(tmp_path / "metrics.jsonl")] == [1]


def failing_open(code: int = errno.ENOSPC):
    real = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda path, mode="r", *a, **k: Full(real(path, mode, *a, **k)) if "w" in mode else real(path, mode, *a, **k)


@pytest.mark.unit
def test_a_rewind_or_a_config_rewrite_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    write_run_config(tmp_path, "name: first\n", {"train_batch_size": 8})
    before = digest(tmp_path)
    monkeypatch.setattr(sink_files, "open", failing_open(), raising=False)
    with pytest.raises(DsTrainerError, match=r"while writing metrics\.jsonl"):
        FileSink(tmp_path).rewind(epoch=1, step=0)
    with pytest.raises(DsTrainerError, match=r"while writing config\.yaml"):
        write_run_config(tmp_path, "name: second\n", {"train_batch_size": 16})
    assert digest(tmp_path) == before  # no temporary left either


@pytest.mark.unit
def test_train_log_on_a_full_disk_says_so_once_in_one_line(tmp_path, capsys):
    root = logging.getLogger("ds_trainer")
    saved = list(root.handlers), root.level, root.propagate
    try:
        configure_logging(0, tmp_path, debug=False)
        handler = next(h for h in root.handlers if isinstance(h, logging.FileHandler))

        def full(text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handler.stream.write = full
        log = logging.getLogger("ds_trainer.test")
        log.info("first")
        log.info("second")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"cannot write {tmp_path / 'train.log'} (No space left on device); train.log stops here" in err
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
                h.close()
        for h in saved[0]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved[1])
        root.propagate = saved[2]


# ------------------------------------------------------------------ a real second run against a training one
@pytest.mark.slow
def test_a_second_run_started_while_one_trains_leaves_it_as_it_was(tmp_path, tiny_shards):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 40, "warmup_epochs": 0},
                       logging={"log_every_n_steps": 1})  # fmt: skip
    env = launch_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    live = subprocess.Popen([sys.executable, "-m", "ds_trainer", "train", "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        steps, ckpt = tmp_path / "run" / "steps.jsonl", tmp_path / "ckpt"
        while not ((ckpt / "latest").is_file() and steps.is_file() and steps.read_text().count("\n") > 20):
            assert live.poll() is None and time.monotonic() < deadline, live.stderr.read() if live.stderr else ""
            time.sleep(0.5)
        fixed = {p: p.read_bytes() for p in (tmp_path / "run" / "config.yaml", tmp_path / "run" / "ds_config.json")}
        grown = {p: p.read_bytes() for p in (steps, tmp_path / "run" / "metrics.jsonl")}
        second = subprocess.run(
            [sys.executable, "-m", "ds_trainer", "train", "--config", str(cfg), "--load-dir", str(ckpt),
             "--set", "training.learning_rate=0.5"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 4, second.stderr[-2000:]
        assert "is in use by a live run" in second.stderr and "Traceback" not in second.stderr
        assert live.poll() is None  # the live run trains on
        for path, content in fixed.items():
            assert path.read_bytes() == content, path
        for path, content in grown.items():  # only appended to by the live run: no row rewound away
            assert path.read_bytes().startswith(content), path
    finally:
        live.kill()
        live.wait(timeout=60)
