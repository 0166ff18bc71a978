"""Layer 2: the Trainer in one process (a DeepSpeed world of one), on in-memory data."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from checkpoint_layouts import rewrite_as_v1
from torch.utils.data import DataLoader, TensorDataset

from ds_trainer import CLIPModel, ConfigError, Trainer
from ds_trainer.errors import CheckpointError


def separable_dataset(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 224, 224, generator=g)
    y = torch.arange(n) % 2
    x[y == 1] += 0.75  # a shift the tiny model learns in a few steps
    return TensorDataset(x, y)


def make_trainer(tmp_path, cls=Trainer, epochs=2, freeze=False, **kwargs):
    torch.manual_seed(0)
    ds = separable_dataset()
    model = CLIPModel(model_name="tiny", mode="fine-tune", freeze_backbone=freeze)
    args = dict(
        optimizer_type="adamw",
        learning_rate=1e-3,
        weight_decay=0.01,
        scheduler_type="cosine",
        num_epochs=epochs,
        device="cpu",
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    args.update(kwargs)
    return cls(
        model=model,
        train_loader=DataLoader(ds, batch_size=8, shuffle=True),
        val_loader=DataLoader(ds, batch_size=16, shuffle=False),
        **args,
    )


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_seed_style_training_writes_metrics_and_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path)
    history = trainer.train()
    ckpt = tmp_path / "ckpt"
    rows = read_rows(ckpt / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "samples_per_s"):
        assert key in rows[-1]
    assert rows[-1]["step"] == 12  # 48 samples / batch 8 = 6 steps per epoch
    assert rows[-1]["val_auc"] > 0.9 and history[-1]["val_auc"] == rows[-1]["val_auc"]
    assert rows[-1]["val_samples"] == 48
    assert (ckpt / "latest").read_text() == "epoch_2"
    for tag in ("epoch_1", "epoch_2", "best"):
        assert (ckpt / tag / "ds_trainer.json").is_file()
    assert json.loads((ckpt / "ds_config.json").read_text())["train_batch_size"] == 8
    assert "learning_rate: 0.001" in (ckpt / "config.yaml").read_text()


def test_without_a_terminal_the_epoch_shows_progress_lines_and_each_epoch_line_says_where(tmp_path, capsys,
                                                                                           monkeypatch):  # fmt: skip
    from ds_trainer.hooks import ProgressLines

    monkeypatch.setattr(ProgressLines, "MAX_INTERVAL_S", 0.0)  # a line at every step (pytest's stderr is no tty)
    make_trainer(tmp_path, epochs=2).train()
    out = capsys.readouterr().out
    assert "Epoch 1/2, step 1/12 (1/6 this epoch), loss " in out and "Epoch 2/2, step 12/12 (6/6 this epoch)" in out
    epoch_lines = [line for line in out.splitlines() if "Train Loss:" in line]
    assert [line.split(" elapsed | ")[0].rsplit(", ", 1)[0] for line in epoch_lines] == [
        "Epoch 1/2, step 6", "Epoch 2/2, step 12"]  # fmt: skip


def test_custom_trainer_loss_is_used(tmp_path):
    calls = []

    class CustomTrainer(Trainer):
        def calculate_loss(self, outputs, targets):
            calls.append(outputs.shape)
            return F.cross_entropy(outputs.float(), targets, label_smoothing=0.1)

    trainer = make_trainer(tmp_path, cls=CustomTrainer, epochs=1)
    trainer.train()
    assert len(calls) == 6 + 3  # 6 training steps, 3 validation batches


def test_resume_from_seed_style_pth_path_continues(tmp_path):
    first = make_trainer(tmp_path, epochs=2)
    first.train()
    saved = {k: v.detach().clone() for k, v in first.model.state_dict().items()}
    lr_at_save = first.engine.get_lr()[0]

    second = make_trainer(tmp_path, epochs=3)
    state = second.resume_from_checkpoint(str(tmp_path / "ckpt" / "epoch_2.pth"))
    assert state["epoch"] == 2 and second.epoch == 2
    assert second.engine.global_steps == 12
    assert second.engine.lr_scheduler.last_batch_iteration == first.engine.lr_scheduler.last_batch_iteration
    assert lr_at_save == 0.0  # the 2-epoch cosine ended at min_lr 0
    # 3 epochs now: the cosine spans 18 steps, and step 13 already runs at its LR (not at the old schedule's 0).
    assert second.engine.get_lr()[0] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 12 / 16)) / 2)
    restored = second.model.state_dict()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    rows = second.train()
    assert [r["epoch"] for r in rows] == [3]
    assert rows[0]["step"] == 18

    # Another backbone_lr_scale regroups the parameters: the optimizer state no longer fits.
    third = make_trainer(tmp_path, epochs=4, backbone_lr_scale=0.1)
    with pytest.raises(CheckpointError, match=r"parameter groups all, all_no_decay; this run has head, head_no_decay, "
                                              r"backbone, backbone_no_decay"):  # fmt: skip
        third.resume_from_checkpoint(str(tmp_path / "ckpt" / "epoch_3"))


def test_resume_errors(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.resume_from_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        trainer.resume_from_checkpoint(tmp_path / "empty")


def test_freeze_backbone_changes_only_the_head(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, freeze=True, learning_rate=1e-2)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_gradient_accumulation_reduces_optimizer_steps(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, grad_accumulation_steps=3)
    rows = trainer.train()
    assert rows[0]["step"] == 2  # 6 micro-batches / 3
    assert trainer.ds_config["train_batch_size"] == 24


def test_the_run_config_is_saved_as_given_not_as_derived(tmp_path):
    # The loader's batch size and the train_loss fallback (no val_loader) are derived settings: the
    # engine uses them, but config.yaml and the checkpoint record what the user asked for, so the
    # config hash does not change between a run and its resume.
    import yaml

    from ds_trainer import checkpoint

    torch.manual_seed(0)
    trainer = Trainer(
        CLIPModel(model_name="tiny"),
        DataLoader(separable_dataset(n=16), batch_size=8),
        None,
        num_epochs=1,
        device="cpu",
        checkpoint_dir=str(tmp_path / "ckpt"),
        run_dir=tmp_path / "run",
    )
    given = trainer.cfg.to_dict()
    trainer.train()
    assert (trainer.settings.batch_size, trainer.settings.monitor) == (8, "train_loss")
    assert trainer.ds_config["train_micro_batch_size_per_gpu"] == 8
    assert trainer.cfg.to_dict() == given
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["training"]["batch_size"] == given["training"]["batch_size"] != 8
    assert saved["training"]["monitor"] == "val_auc"
    state = json.loads((tmp_path / "ckpt" / "epoch_1" / "ds_trainer.json").read_text())
    assert state["config"] == given and state["config_hash"] == checkpoint.config_hash(given)
    assert state["monitor"] == "train_loss" and state["micro_batch_size"] == 8


def test_early_stopping(tmp_path):
    trainer = make_trainer(
        tmp_path, epochs=10, early_stopping=True, patience=1, learning_rate=1e-9, scheduler_type="none"
    )
    rows = trainer.train()
    assert len(rows) < 10
    assert (tmp_path / "ckpt" / "latest").read_text() == f"epoch_{len(rows)}"


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown keyword 'learnig_rate'"):
        make_trainer(tmp_path, learnig_rate=1e-3)
    with pytest.raises(ConfigError, match="training.learning_rate"):
        make_trainer(tmp_path, learning_rate=-1.0)
    trainer = make_trainer(tmp_path, batch_size=16)
    with pytest.raises(ConfigError, match="batch_size is 16, but train_loader yields batches of 8"):
        trainer.train()


@pytest.mark.parametrize("omp", [None, "2"])
def test_cpu_threads_leave_a_core_to_each_loader_worker(tmp_path, monkeypatch, omp):
    # Loader workers decoding beside the step's OpenMP threads oversubscribe the cores (measured
    # 10-20x slower steps on 2 cores); OMP_NUM_THREADS set by the user is left alone.
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ds = separable_dataset(n=8)
        trainer = Trainer(
            CLIPModel(model_name="tiny"),
            DataLoader(ds, batch_size=4, num_workers=1),
            None,
            device="cpu",
            num_epochs=1,
            checkpoint_dir=str(tmp_path / "ckpt"),
            run_dir=tmp_path / "run",
        )
        trainer.setup()
        assert torch.get_num_threads() == (2 if omp else 1)
    finally:
        torch.set_num_threads(before)


def two_epoch_trainer(root):
    """Six unshuffled steps an epoch: a preempted run and its resume see the batches an uninterrupted one does."""
    torch.manual_seed(0)
    ds = separable_dataset()
    return Trainer(model=CLIPModel(model_name="tiny"), train_loader=DataLoader(ds, batch_size=8),
                   val_loader=DataLoader(ds, batch_size=16), learning_rate=1e-3, num_epochs=2, device="cpu",
                   checkpoint_dir=str(root / "ckpt"), run_dir=root / "run")  # fmt: skip


@pytest.mark.parametrize("stop_at", [3, 6])  # optimizer steps into epoch 2 (of 6): mid-epoch, and its last batch
def test_a_preempted_epoch_resumes_with_the_whole_epochs_metrics(tmp_path, stop_at):
    from ds_trainer.errors import Preempted

    reference = two_epoch_trainer(tmp_path / "ref").train()
    first = two_epoch_trainer(tmp_path / "a")
    first.preemption.should_stop = lambda: int(first.engine.global_steps) == 6 + stop_at
    with pytest.raises(Preempted, match=f"{stop_at} batches into epoch 2"):
        first.train()
    state = json.loads((tmp_path / "a" / "ckpt" / f"step_{6 + stop_at}" / "ds_trainer.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (1, stop_at) and state["partial_epoch"]["seen"] == 8 * stop_at
    second = two_epoch_trainer(tmp_path / "a")
    second.resume_from_checkpoint(tmp_path / "a" / "ckpt")
    rows = second.train()
    # Epoch 2's row covers all its batches (those before the preemption too), like the uninterrupted run's;
    # preempted at its last batch, the resume trains nothing and only finishes the epoch.
    assert [r["epoch"] for r in rows] == [2] and rows[0]["step"] == 12
    assert rows[0]["train_loss"] == pytest.approx(reference[1]["train_loss"], rel=1e-5)
    assert rows[0]["train_acc"] == reference[1]["train_acc"]
    assert rows[0]["val_loss"] == pytest.approx(reference[1]["val_loss"], rel=1e-4)
    if stop_at == 6:
        assert math.isnan(rows[0]["samples_per_s"])


def test_a_version_1_preemption_checkpoint_resumes_like_the_current_layout(tmp_path):
    # Checkpoints written before the component split hold the epoch's partial totals as a positional
    # list; resume.read upgrades them, and the resumed epoch's row matches the uninterrupted run's.
    from ds_trainer.errors import Preempted

    reference = two_epoch_trainer(tmp_path / "ref").train()
    first = two_epoch_trainer(tmp_path / "a")
    first.preemption.should_stop = lambda: int(first.engine.global_steps) == 8
    with pytest.raises(Preempted):
        first.train()
    old = rewrite_as_v1(tmp_path / "a" / "ckpt" / "step_8")
    assert old["version"] == 1 and isinstance(old["partial_epoch"], list) and old["partial_epoch"][2] == 16
    second = two_epoch_trainer(tmp_path / "a")
    second.resume_from_checkpoint(tmp_path / "a" / "ckpt")
    rows = second.train()
    assert [r["epoch"] for r in rows] == [2] and rows[0]["step"] == 12
    assert rows[0]["train_loss"] == pytest.approx(reference[1]["train_loss"], rel=1e-5)
    assert rows[0]["train_acc"] == reference[1]["train_acc"]


def test_a_preemption_is_one_information_line_and_exit_75(tmp_path, tiny_shards, monkeypatch, capsys):
    import signal

    from conftest import write_config

    from ds_trainer import cli
    from ds_trainer.preemption import PreemptionGuard

    def signalled(guard):  # as if Slurm's SIGUSR1 had arrived before the first step's poll
        guard.signum = signal.SIGUSR1
        return True

    monkeypatch.setattr(PreemptionGuard, "should_stop", signalled)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0},
                       logging={"tensorboard": False})  # fmt: skip
    assert cli.main(["train", "--config", str(cfg)]) == 75
    captured = capsys.readouterr()
    assert "error" not in captured.err
    lines = [line for line in captured.out.splitlines() if "SIGUSR1" in line]
    assert len(lines) == 1, captured.out
    assert lines[0].startswith("SIGUSR1 received: saved ") and f"resume with --load-dir {tmp_path / 'ckpt'}" in lines[0]
    assert (tmp_path / "ckpt" / "PREEMPTED").is_file()


@pytest.mark.parametrize("stage", [0, 1])
def test_a_checkpoint_from_before_merged_groups_still_resumes(tmp_path, stage):
    # ds_trainer before the group merge always kept backbone and head apart (four groups) and did not
    # record its groups; such a checkpoint must resume, not fail inside DeepSpeed's optimizer load.
    first = make_trainer(tmp_path, epochs=1, zero_stage=stage, backbone_lr_scale=0.5)
    first.train()
    state = json.loads((tmp_path / "ckpt" / "epoch_1" / "ds_trainer.json").read_text())
    assert state["param_groups"] == ["head", "head_no_decay", "backbone", "backbone_no_decay"]
    rewrite_as_v1(tmp_path / "ckpt" / "epoch_1", merged_groups=False)
    second = make_trainer(tmp_path, epochs=2, zero_stage=stage)  # backbone_lr_scale 1: merged groups for new runs
    second.resume_from_checkpoint(tmp_path / "ckpt")
    assert second.group_names == ["head", "head_no_decay", "backbone", "backbone_no_decay"]
    rows = second.train()
    assert [r["epoch"] for r in rows] == [2] and math.isfinite(rows[0]["train_loss"])
