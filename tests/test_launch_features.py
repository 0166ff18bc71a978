"""Layer 3: the issue-3 features on two real ranks through ./launch.sh (DeepSpeed's launcher, gloo).

One run covers the epoch policy (plateau LR, best checkpoint, early stopping, keep_last) and the
logging outputs; one run per strategy shows each trains (or, zero-shot, evaluates) on 2 ranks.
"""

import json
import math

import pytest
from conftest import run_cmd, write_config

pytestmark = pytest.mark.distributed


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def launch(cfg):
    proc = run_cmd(["./launch.sh", "--config", str(cfg)], DS_TRAINER_CPU_RANKS="2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# make test-slow: plateau, best, early stopping, keep_last and the sinks are tested in-process and as units; this on two ranks
@pytest.mark.slow
def test_plateau_best_early_stopping_and_logs_on_two_ranks(tmp_path, tiny_shards):
    # min_delta 10 on val_loss: only the first epoch can count as an improvement, so the policy's
    # outcome is fixed whatever the data does: the LR halves after epochs 2 and 3, training stops
    # after epoch 3 (patience 2), `best` holds epoch 1 and keep_last 1 leaves epoch_3 alone.
    cfg = write_config(
        tmp_path / "cfg.yaml", tiny_shards,
        training={"num_epochs": 8, "warmup_epochs": 0, "scheduler": "plateau", "monitor": "val_loss", "min_delta": 10.0,
                  "plateau_patience": 0, "plateau_factor": 0.5, "early_stopping": True, "patience": 2,
                  "save_frequency": 1, "keep_last": 1, "learning_rate": 1e-3, "min_lr": 1e-5},
        logging={"log_every_n_steps": 1, "wandb": {"enabled": True, "project": "t"}},
    )  # fmt: skip
    proc = launch(cfg)
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    rows = jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "Early stopping: val_loss has not improved for 2 epochs" in proc.stdout
    assert f"Best checkpoint: {ckpt / 'best'} (epoch 1, val_loss" in proc.stdout
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["best", "epoch_3"]
    assert json.loads((ckpt / "best" / "ds_trainer.json").read_text())["epoch"] == 1
    # 128 train images / (2 ranks x batch 8): 8 optimizer steps per epoch; LR scale 1, 1, 0.5 by epoch.
    steps = jsonl(run / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 25))
    for s in steps:
        want = 1e-3 * [1.0, 1.0, 0.5][(s["step"] - 1) // 8]
        assert s["train/lr"] == pytest.approx(want), s
        assert math.isfinite(s["train/grad_norm"]) and s["train/grad_norm"] > 0
        # samples/s over both ranks and MFU against the CPU's measured matmul rate, every log step.
        assert s["train/samples_per_s"] > 0 and 0 < s["train/mfu"] < 1, s
    for r in rows:
        assert 0 < r["mfu"] < 1 and r["train_tflops"] > 0 and 0 <= r["data_wait_fraction"] < 1, r
    state = json.loads((ckpt / "epoch_3" / "ds_trainer.json").read_text())
    assert state["plateau"]["scale"] == pytest.approx(0.25) and state["world_size"] == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/lr",
        "train/grad_norm",
        "train/loss",
        "val/auc",
        "epoch/train_loss",
        "train/mfu",
        "epoch/mfu",
    } <= tags
    assert [e.step for e in acc.Scalars("val/loss")] == [8, 16, 24]
    assert acc.Scalars("val/loss")[0].value == pytest.approx(rows[0]["val_loss"], rel=1e-5)
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0  # rank 0 only, offline without a key
    # Only rank 0 wrote the logs: one line per step, not two.
    assert len({s["step"] for s in steps}) == len(steps)


@pytest.mark.parametrize(
    "name, model, deepspeed",
    [
        # The frozen-backbone strategies take the engine path LoRA takes (their trainable parameters are
        # checked in-process by tests/test_strategies.py): on two ranks in `make test-slow`.
        pytest.param("linear_probe", {"freeze_backbone": True}, {"zero_stage": 1}, marks=pytest.mark.slow),
        ("lora", {"lora": {"enabled": True, "r": 4, "alpha": 8}}, {"zero_stage": 2}),
        pytest.param(
            "prompt_tuning", {"mode": "prompt-tuning", "prompt_length": 4}, {"zero_stage": 1}, marks=pytest.mark.slow
        ),
        # CPU offload trains in-process in make test (tests/test_training_features.py::test_offload_optimizer_to_cpu_trains).
        pytest.param("offload", {}, {"zero_stage": 2, "offload_optimizer": "cpu"}, marks=pytest.mark.slow),
    ],
)
def test_strategies_train_on_two_ranks(tmp_path, tiny_shards, name, model, deepspeed):
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_shards,
        model=model,
        deepspeed=deepspeed,
        training={"num_epochs": 1, "warmup_epochs": 0, "learning_rate": 1e-2 if name == "prompt_tuning" else 1e-3},
    )
    proc = launch(cfg)
    rows = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["step"] == 8 and rows[0]["val_samples"] == 48
    assert math.isfinite(rows[0]["train_loss"]) and math.isfinite(rows[0]["val_loss"])
    log = (tmp_path / "run" / "train.log").read_text()
    groups = log.split("trainable parameters in groups ")[1].splitlines()[0]
    expected = {
        "linear_probe": "head, head_no_decay",
        # backbone_lr_scale 1: backbone and head with the same LR and decay share a group
        "lora": "all, head_no_decay",
        "prompt_tuning": "head",
        "offload": "all, all_no_decay",
    }[name]
    assert groups == expected, proc.stdout[-2000:]
    assert (tmp_path / "ckpt" / "epoch_1" / "ds_trainer.json").is_file()


# make test-slow: zero-shot evaluation is tested in-process (tests/test_strategies.py); this on two ranks
@pytest.mark.slow
def test_zero_shot_evaluates_only_on_two_ranks(tmp_path, tiny_shards):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, model={"mode": "zero-shot"}, deepspeed={"zero_stage": 2})
    proc = launch(cfg)
    rows = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["val_samples"] == 48
    assert "train_loss" not in rows[0] and 0.0 <= rows[0]["val_auc"] <= 1.0
    assert "no trainable parameters: evaluation only" in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "ckpt").exists()  # nothing trained, nothing saved
    assert "Val Loss:" in proc.stdout
