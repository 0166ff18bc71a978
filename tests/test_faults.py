"""Faults: a killed rank, a crash or a full disk while saving, non-finite losses, two runs on one directory.

Faults are injected with DS_TRAINER_FAULT (ds_trainer/faults.py): a real SIGKILL of a real rank,
an ENOSPC raised from torch.save inside DeepSpeed's save, a NaN loss at a chosen micro-batch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cmd, write_config

from ds_trainer import cli
from ds_trainer.checkpoint import LATEST, MARKER, resolve
from ds_trainer.errors import CheckpointError
from ds_trainer.run_lock import LOCK_NAME, DirLock


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the checkpoint_dir lock (pure)
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_refuses_a_second_run(tmp_path):
    first = DirLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(
        CheckpointError, match=rf"in use by a live run \(host {socket.gethostname()}, PID {os.getpid()}"
    ):
        DirLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    DirLock(tmp_path).acquire()  # free again


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": "x"}))
    lock = DirLock(tmp_path)
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert "taking over the lock" in caplog.text and "is gone" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_another_hosts_lock_is_stale_only_once_it_stops_refreshing(tmp_path, caplog):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "started": "x"}))
    with pytest.raises(CheckpointError, match="host gpu-node-17, PID 4242"):
        DirLock(tmp_path, stale_after_s=600).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    with caplog.at_level("WARNING"):
        DirLock(tmp_path, stale_after_s=600).acquire()
    assert "has not refreshed it" in caplog.text


def test_train_refuses_a_checkpoint_dir_a_live_run_holds(tmp_path, tiny_shards, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0})
    holder = DirLock(tmp_path / "ckpt")
    holder.acquire()  # this (live) process plays the other run
    try:
        assert cli.main(["train", "--config", str(cfg)]) == 4
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert f"ckpt is in use by a live run (host {socket.gethostname()}, PID {os.getpid()}" in err
    assert not (tmp_path / "ckpt" / LATEST).exists()


# ------------------------------------------------------------------ non-finite loss and weights
def test_nan_loss_stops_naming_step_epoch_and_samples(tmp_path, tiny_shards, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0})
    monkeypatch.setenv("DS_TRAINER_FAULT", "nan:step=3")
    assert cli.main(["train", "--config", str(cfg)]) == 5
    err = capsys.readouterr().err
    assert re.search(r"non-finite loss at epoch 1, optimizer step 3, micro-batch 3; samples: \S+", err), err
    assert "training.on_nonfinite: skip" in err
    assert not (tmp_path / "ckpt" / LATEST).exists()  # nothing was saved


def test_nan_loss_skip_drops_those_updates_and_counts_them(tmp_path, tiny_shards, monkeypatch):
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_shards,
        training={"num_epochs": 1, "warmup_epochs": 0, "on_nonfinite": "skip", "max_nonfinite_steps": 3},
    )
    monkeypatch.setenv("DS_TRAINER_FAULT", "nan:step=3:count=2")
    assert cli.main(["train", "--config", str(cfg)]) == 0
    (row,) = rows_of(tmp_path / "run")
    # 128 images / batch 8 = 16 micro-batches; 2 skipped, so 14 optimizer steps.
    assert row["train_nonfinite_steps"] == 2 and row["step"] == 14
    assert row["train_loss"] == row["train_loss"]  # finite mean over the batches that trained
    state = json.loads((tmp_path / "ckpt" / "epoch_1" / MARKER).read_text())
    assert state["global_step"] == 14


def test_too_many_nan_losses_in_a_row_fail(tmp_path, tiny_shards, capsys, monkeypatch):
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_shards,
        training={"num_epochs": 1, "warmup_epochs": 0, "on_nonfinite": "skip", "max_nonfinite_steps": 3},
    )
    monkeypatch.setenv("DS_TRAINER_FAULT", "nan:step=3:count=5")
    assert cli.main(["train", "--config", str(cfg)]) == 5
    assert "3 non-finite losses in a row (training.max_nonfinite_steps)" in capsys.readouterr().err


def test_non_finite_weights_are_never_saved(tmp_path, tiny_shards):
    from ds_trainer import CLIPModel, Trainer
    from ds_trainer.data import make_shard_loader
    from ds_trainer.errors import TrainingError

    loader = make_shard_loader(tiny_shards, "train", batch_size=8, train=True, num_workers=1)
    trainer = Trainer(
        CLIPModel("tiny"),
        loader,
        None,
        device="cpu",
        checkpoint_dir=str(tmp_path / "ckpt"),
        run_dir=tmp_path / "run",
        num_epochs=1,
        warmup_epochs=0,
    )
    trainer.save_checkpoint("epoch_0")
    with torch.no_grad():
        next(trainer.engine.module.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingError, match=r"not saving best: the weights hold NaN/Inf"):
        trainer.save_checkpoint("best", update_latest=False)
    assert not (tmp_path / "ckpt" / "best").exists()
    assert (tmp_path / "ckpt" / LATEST).read_text() == "epoch_0"


# ------------------------------------------------------------------ a full disk while saving
def test_full_disk_while_saving_names_the_directory_and_keeps_the_last_checkpoint(
    tmp_path, tiny_shards, capsys, monkeypatch
):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 2, "warmup_epochs": 0})
    monkeypatch.setenv("DS_TRAINER_FAULT", "enospc:tag=epoch_2")
    assert cli.main(["train", "--config", str(cfg)]) == 4
    err = capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    assert re.search(
        rf"no space left on the device of {re.escape(str(ckpt))} while saving epoch_2: a checkpoint "
        r"needs about [\d.]+ MiB \(the size of the last checkpoints\), .* free; epoch_1 is intact",
        err,
    ), err
    assert (ckpt / LATEST).read_text() == "epoch_1"
    assert resolve(ckpt) == (ckpt, "epoch_1")
    assert not (ckpt / "epoch_2").exists() and not (ckpt / "epoch_2.partial").exists()
    assert not (ckpt / LOCK_NAME).exists()  # released on the way out


# ------------------------------------------------------------------ a killed rank, 2 real ranks
def launch(cfg: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {"DS_TRAINER_CPU_RANKS": "2"} | ({"DS_TRAINER_FAULT": fault} if fault else {})
    return run_cmd(["./launch.sh", "--config", str(cfg), *args], **env)


def final_weights(ckpt: Path, tag: str = "epoch_3") -> dict[str, torch.Tensor]:
    from ds_trainer.consolidate import consolidated_state_dict, rebuild_model, resolve_source

    source = resolve_source(ckpt, tag)
    return consolidated_state_dict(source, rebuild_model(source))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_shards):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = write_config(tmp / "cfg.yaml", tiny_shards)
    out = launch(cfg)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp


def assert_same_run(tmp: Path, reference: Path) -> None:
    assert [r["epoch"] for r in rows_of(tmp / "run")] == [1, 2, 3]  # history continuous, no epoch twice
    ref_rows = rows_of(reference / "run")
    for ours, theirs in zip(rows_of(tmp / "run"), ref_rows):
        assert ours["step"] == theirs["step"]
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    ours, theirs = final_weights(tmp / "ckpt"), final_weights(reference / "ckpt")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_shards, uninterrupted):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards)
    # 8 optimizer steps per epoch: rank 0 is SIGKILLed in the middle of epoch 2.
    out = launch(cfg, fault="kill:step=12:rank=0")
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    killed = re.search(r"fault injected \(DS_TRAINER_FAULT\): kill after step 12 on rank 0; .* at t=([\d.]+)", text)
    assert killed, text[-3000:]
    # The survivor does not hang: the launcher ends the job promptly (distributed.timeout_s is the backstop).
    assert time.time() - float(killed.group(1)) < 60
    assert [r["epoch"] for r in rows_of(tmp_path / "run")] == [1]
    assert (tmp_path / "ckpt" / LATEST).read_text() == "epoch_1"
    # The dead rank 0 still "holds" the checkpoint_dir; the resumed run takes the lock over.
    assert (tmp_path / "ckpt" / LOCK_NAME).is_file()

    resumed = launch(cfg, "--load-dir", str(tmp_path / "ckpt"))
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-3000:]
    assert "taking over the lock" in text and "resumed from" in text
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_shards, uninterrupted):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards)
    out = launch(cfg, fault="crash_in_save:tag=epoch_2:rank=0")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "crash while saving epoch_2 on rank 0" in text, text[-3000:]
    ckpt = tmp_path / "ckpt"
    # DeepSpeed's files for epoch_2 are on disk, but never became a checkpoint.
    assert any((ckpt / "epoch_2.partial").glob("*.pt")) and not (ckpt / "epoch_2").exists()
    assert (ckpt / LATEST).read_text() == "epoch_1" and resolve(ckpt) == (ckpt, "epoch_1")

    resumed = launch(cfg, "--load-dir", str(ckpt))
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert not (ckpt / "epoch_2.partial").exists()
    assert_same_run(tmp_path, uninterrupted)


def test_stop_policy_checks_without_a_host_sync_per_step(monkeypatch):
    from ds_trainer.errors import TrainingError
    from ds_trainer.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard("stop", 10, torch.device("cpu"), world_size=1)
    real_item = torch.Tensor.item

    def no_sync(self):
        raise AssertionError("a host sync in the step loop")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    losses = [1.0, 0.5, float("nan"), float("inf"), 0.2]
    for micro, value in enumerate(losses, start=1):
        assert guard.admit(torch.tensor(value), micro, epoch=2, opt_step=micro, keys=[f"k{micro}a", f"k{micro}b"])
    monkeypatch.setattr(torch.Tensor, "item", real_item)
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, optimizer step 3, micro-batch 3; "
                                            r"samples: k3a, k3b\. Lower"):  # fmt: skip
        guard.check()
    guard.check()  # reported once; nothing pending after it
    clean = NonFiniteGuard("stop", 10, torch.device("cpu"), world_size=1)
    clean.admit(torch.tensor(0.3), 1, 1, 1, [])
    clean.check()


def test_skip_policy_decides_per_micro_batch():
    from ds_trainer.errors import TrainingError
    from ds_trainer.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard("skip", 2, torch.device("cpu"), world_size=1)
    assert guard.admit(torch.tensor(1.0), 1, 1, 1, [])
    assert not guard.admit(torch.tensor(float("nan")), 2, 1, 2, ["a"])
    assert guard.admit(torch.tensor(1.0), 3, 1, 2, []) and guard.in_a_row == 0
    assert not guard.admit(torch.tensor(float("nan")), 4, 1, 3, [])
    with pytest.raises(TrainingError, match="2 non-finite losses in a row"):
        guard.admit(torch.tensor(float("inf")), 5, 1, 3, [])


@pytest.mark.distributed
def test_nan_on_one_rank_stops_both_at_the_deferred_check(tmp_path, tiny_shards):
    # log_every_n_steps 5: rank 1's loss turns NaN at micro-batch 3; both ranks learn it at step 5's check.
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0},
                       logging={"log_every_n_steps": 5})  # fmt: skip
    out = launch(cfg, fault="nan:step=3:rank=1")
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert re.search(r"non-finite loss at epoch 1, optimizer step 3, micro-batch 3; samples: \S+", text), text[-3000:]
    assert not (tmp_path / "ckpt" / LATEST).exists()
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert all(s["step"] < 5 for s in steps)  # step 5 raised before logging a NaN loss


def test_injected_faults_are_parsed_strictly():
    from ds_trainer.faults import parse

    assert [(f.kind, f.args) for f in parse("kill:step=3:rank=1,nan:step=2")] == [
        ("kill", {"step": "3", "rank": "1"}),
        ("nan", {"step": "2"}),
    ]
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        parse("explode:step=1")


@pytest.mark.distributed
def test_without_a_launcher_the_survivor_of_a_killed_rank_exits_within_the_timeout(tmp_path, tiny_shards):
    # Two ranks started by hand (as `srun` does in task mode): nobody watches them but the
    # process group, so distributed.timeout_s is what bounds the survivor's wait.
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, distributed={"timeout_s": 30})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_", "WORLD_", "MASTER_"))}
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONPATH=str(Path(__file__).parents[1]),
            DS_TRAINER_FAULT="kill:step=3:rank=1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ds_trainer", "train", "--config", str(cfg)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    ended = time.time()
    assert procs[1].returncode == -9, outs[1][-2000:]
    killed = re.search(r"kill after step 3 on rank 1; .* at t=([\d.]+)", outs[1])
    assert killed, outs[1][-2000:]
    # The survivor says what happened in one line, with its own exit code, not a traceback.
    assert procs[0].returncode == 6, outs[0][-2000:]
    assert re.search(r"ds-trainer train: error: lost contact with another rank \(.*\): a rank died", outs[0])
    assert "Traceback" not in outs[0]
    assert ended - float(killed.group(1)) < 30 + 30  # the timeout, plus process teardown
