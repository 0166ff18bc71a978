"""Layers 3-4: two real CPU ranks through the real deepspeed launcher, driven by the CLI."""

import json
import math
import shutil
import socket
import sys
from pathlib import Path

import pytest
from conftest import run_cmd, write_config

from ds_trainer.distributed import SHM_DIR, SHM_PREFIX
from ds_trainer.metrics import ALL_METRICS

pytestmark = pytest.mark.distributed


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cosine_lr(step, total, warmup, lr, min_lr):
    """The LR after `step` optimizer steps: DeepSpeed's WarmupCosineLR at iteration step + 1."""
    it, warmup = step + 1, max(2, warmup)
    if it < warmup:
        return lr * it / warmup
    progress = min(1.0, (it - warmup + 1) / max(1, total - warmup))
    ratio = min_lr / lr
    return lr * (ratio + (1 - ratio) * (1 + math.cos(math.pi * progress)) / 2)


def test_two_ranks_train_checkpoint_and_resume(tmp_path, tiny_shards):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards)
    first = run_cmd(["./launch.sh", "--config", str(cfg)], DS_TRAINER_CPU_RANKS="2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = rows_of(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # 128 train samples / (2 ranks x batch 8) = 8 steps per epoch on every rank
    assert [r["step"] for r in rows] == [8, 16, 24]
    assert all(r["val_samples"] == 48 for r in rows)  # every val image once, gathered from both ranks
    for r in rows:
        assert r["lr"] == pytest.approx(cosine_lr(r["step"], 24, 8, 1e-3, 1e-5), rel=1e-6)
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "epoch_3"
    state = json.loads((ckpt / "epoch_3" / "ds_trainer.json").read_text())
    assert (state["epoch"], state["global_step"], state["world_size"]) == (3, 24, 2)
    ds = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == 1
    assert (tmp_path / "run" / "config.yaml").is_file()

    # Pretend the job died during epoch 3: its checkpoint never completed.
    shutil.rmtree(ckpt / "epoch_3")
    (ckpt / "latest").write_text("epoch_3")  # a stale pointer must not be trusted
    second = run_cmd(
        [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            "2",
            "launch.sh",
            "--config",
            str(cfg),
            "--load-dir",
            str(ckpt),
            "--set",
            f"logging.run_dir={tmp_path / 'run2'}",
        ],
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    resumed = rows_of(tmp_path / "run2")
    assert [r["epoch"] for r in resumed] == [3]
    assert resumed[0]["step"] == rows[2]["step"] == 24
    assert resumed[0]["lr"] == pytest.approx(rows[2]["lr"], rel=1e-9)
    # Same weights, optimizer state and data order as the uninterrupted run: the same epoch.
    assert resumed[0]["train_loss"] == pytest.approx(rows[2]["train_loss"], rel=1e-3)
    assert resumed[0]["val_loss"] == pytest.approx(rows[2]["val_loss"], rel=1e-3)
    assert (ckpt / "latest").read_text() == "epoch_3"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHM_PROBE = """
import os, deepspeed
from ds_trainer.distributed import _unlink_shm_buffer, shm_buffer_path
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="%s")
deepspeed.init_distributed()
made = shm_buffer_path(0).exists()
_unlink_shm_buffer()
print(made, shm_buffer_path(0).exists())
"""


def test_shm_allreduce_buffer_is_unlinked_after_init():
    # DeepSpeed creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> and never
    # removes it: every run leaked 66 MiB of RAM per rank (CI ran out of memory after a few hundred).
    out = run_cmd([sys.executable, "-c", SHM_PROBE % free_port()])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["True", "False"]  # our name matches DeepSpeed's, and it is gone


# make test-slow: every refusal's code and message is in make test in-process (tests/test_refusals.py); this through a subprocess
@pytest.mark.slow
def test_cli_user_errors_exit_with_codes_and_no_traceback(tmp_path, tiny_shards):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "no-such-shards")
    out = run_cmd([sys.executable, "-m", "ds_trainer", "train", "--config", str(cfg)])
    assert out.returncode == 3, out.stderr[-2000:]
    assert "no-such-shards" in out.stderr and "Traceback" not in out.stderr
    cfg = write_config(tmp_path / "cfg2.yaml", tiny_shards)
    out = run_cmd(
        [sys.executable, "-m", "ds_trainer", "train", "--config", str(cfg), "--load-dir", str(tmp_path / "nothing")]
    )
    assert out.returncode == 4 and "does not exist" in out.stderr and "Traceback" not in out.stderr


# ZeRO 3 (the short rank's dummy batches) in `make test`; ZeRO 0 and 2 in `make test-slow` (two-rank ZeRO 2
# trains in make test's elastic, preemption and export tests).
@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_two_ranks_each_zero_stage_trains_and_evaluates(tmp_path, tiny_shards, stage):
    # Eval shards are uneven across the ranks; under ZeRO-3 the short rank must keep joining
    # the parameter all-gathers with dummy batches or the job hangs.
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_shards,
        training={"num_epochs": 1, "warmup_epochs": 0},
        deepspeed={"zero_stage": stage},
        # trained on the other generator: the validation rows hold the unseen-generators mean too
        data={"eval_batch_size": 5, "eval_generators": ["demo_nearest"], "train_generators": ["demo_bicubic"]},
    )  # val shards of 20 and 4
    port = str(free_port())
    out = run_cmd(["./launch.sh", "--config", str(cfg)], DS_TRAINER_CPU_RANKS="2", MASTER_PORT=port)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (66 MiB of RAM per rank) are gone once the job ends.
    assert sorted(SHM_DIR.glob(f"{SHM_PREFIX}_*_{port}_*")) == []
    (row,) = rows_of(tmp_path / "run")
    assert row["step"] == 4 and row["val_samples"] == 24  # demo_bicubic's 64 train images / (2 ranks x 8)
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    assert set(row["val_generators"]) == {"demo_nearest", "mean", "mean_unseen"}
    for k in ALL_METRICS:  # every metric's means, computed from the one (unseen) cell
        assert row[f"val_mean_{k}"] == row[f"val_mean_unseen_{k}"] == row["val_generators"]["demo_nearest"][k], k
    assert json.loads((tmp_path / "ckpt" / "epoch_1" / "ds_trainer.json").read_text())["zero_stage"] == stage
