"""Layer 2: optimizers, schedules, accumulation, clipping and checkpoint policy in one process.

Each test runs the real DeepSpeed engine (a world of one) on the tiny CLIP and reads back what
the run logged: the LR applied at every optimizer step comes from `<run_dir>/steps.jsonl`.
"""

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ds_trainer import CLIPModel, Trainer

STEPS_PER_EPOCH = 4  # 32 samples / batch 8


def dataset(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 224, 224, generator=g)
    y = torch.arange(n) % 2
    x[y == 1] += 0.5
    return TensorDataset(x, y)


def make(tmp_path, name="run", batch_size=8, val=True, freeze=False, **kwargs):
    torch.manual_seed(0)
    ds = dataset()
    args = dict(
        learning_rate=1e-3,
        num_epochs=4,
        device="cpu",
        checkpoint_dir=str(tmp_path / name / "ckpt"),
        run_dir=str(tmp_path / name),
    )
    args.update(kwargs)
    trainer = Trainer(
        CLIPModel("tiny", freeze_backbone=freeze),
        DataLoader(ds, batch_size=batch_size, shuffle=False),
        DataLoader(ds, batch_size=16) if val else None,
        **args,
    )
    trainer.cfg.logging.log_every_n_steps = 1
    return trainer


def steps(tmp_path, name="run"):
    return [json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]


def lr_curve(tmp_path, name="run"):
    return {r["step"]: r["train/lr"] for r in steps(tmp_path, name)}


def test_cosine_curve_matches_deepspeed_warmup_cosine_formula(tmp_path):
    make(tmp_path, scheduler="cosine", warmup_epochs=1, min_lr=1e-5, num_epochs=4).train()
    curve = lr_curve(tmp_path)
    assert sorted(curve) == list(range(1, 17))
    for step, got in curve.items():
        assert got == pytest.approx(cosine_lr(step, total=16, warmup=4, lr=1e-3, min_lr=1e-5), rel=1e-6), step
    assert curve[1] == pytest.approx(1e-3 / 4)  # no step runs at LR 0
    assert curve[16] == pytest.approx(1e-5)  # the last step lands on min_lr


def cosine_lr(step, total, warmup, lr, min_lr):
    """DeepSpeed's WarmupCosineLR (linear) at iteration `step`: optimizer step n runs at iteration n."""
    warmup, floor = max(2, warmup), min_lr / lr  # DeepSpeed uses at least 2 warmup steps
    if step < warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)


def test_extending_a_finished_cosine_run_follows_the_longer_schedule_and_says_so(tmp_path, capsys):
    kw = dict(scheduler="cosine", warmup_epochs=1, min_lr=1e-5)
    make(tmp_path, "short", num_epochs=2, **kw).train()  # steps 1-8: ends on min_lr
    longer = make(tmp_path, "long", num_epochs=4, **kw)
    longer.resume_from_checkpoint(tmp_path / "short" / "ckpt")
    out = capsys.readouterr().out
    longer.train()
    after = lr_curve(tmp_path, "long")
    assert sorted(after) == list(range(9, 17))
    # As if configured for 4 epochs from the start, from the very first resumed step (not min_lr, then a jump).
    for step, got in after.items():
        assert got == pytest.approx(cosine_lr(step, total=16, warmup=4, lr=1e-3, min_lr=1e-5), rel=1e-6), step
    warning = [line for line in out.splitlines() if "cosine LR schedule" in line]
    assert warning == [
        f"training.num_epochs 2 -> 4: the cosine LR schedule now spans 4 epochs (16 optimizer steps; the checkpoint's "
        f"spanned 8), as if the run had been configured so from the start: step 9 runs at LR {after[9]:.3g} (the "
        f"checkpoint's schedule: 1e-05), then the LR decays to min_lr 1e-05 at step 16"
    ]

    again = make(tmp_path, "again", num_epochs=4, **kw)
    again.resume_from_checkpoint(tmp_path / "long" / "ckpt")
    assert again.train() == []
    assert (
        "nothing to train: the checkpoint finished epoch 4 of 4; raise training.num_epochs" in capsys.readouterr().out
    )


def test_step_curve_matches_formula_and_continues_after_resume(tmp_path):
    kw = dict(scheduler="step", step_size=1, gamma=0.5, warmup_epochs=1, num_epochs=4, save_frequency=1)
    full = make(tmp_path, "full", **kw)
    full.train()
    curve = lr_curve(tmp_path, "full")
    for step, got in curve.items():
        k = step - 1
        warm = (k + 1) / STEPS_PER_EPOCH if k < STEPS_PER_EPOCH else 1.0
        assert got == pytest.approx(1e-3 * warm * 0.5 ** (k // STEPS_PER_EPOCH)), step

    resumed = make(tmp_path, "resumed", **kw)
    resumed.resume_from_checkpoint(tmp_path / "full" / "ckpt" / "epoch_2")
    rows = resumed.train()
    assert [r["epoch"] for r in rows] == [3, 4]
    after = lr_curve(tmp_path, "resumed")
    assert sorted(after) == list(range(9, 17))
    for step, got in after.items():
        assert got == pytest.approx(curve[step], rel=1e-9), step
    # Same data order, same weights and optimizer state: the same losses, to float noise.
    assert rows[0]["train_loss"] == pytest.approx(full.history[2]["train_loss"], rel=1e-4)


def test_plateau_steps_on_validation_metric_and_resumes_its_state(tmp_path):
    # min_delta 10 on val_loss: no epoch after the first can improve, so with patience 0 every
    # later epoch halves the LR, whatever the data does.
    kw = dict(
        scheduler="plateau",
        monitor="val_loss",
        min_delta=10.0,
        plateau_patience=0,
        plateau_factor=0.5,
        min_lr=1e-4,
        num_epochs=5,
        save_frequency=1,
    )
    full = make(tmp_path, "full", **kw)
    full.train()
    curve = lr_curve(tmp_path, "full")
    scale_by_epoch = [1.0, 1.0, 0.5, 0.25, 0.125]  # epoch 1 improves on nothing; the floor is 0.1
    for step, got in curve.items():
        epoch = (step - 1) // STEPS_PER_EPOCH
        assert got == pytest.approx(1e-3 * max(0.1, scale_by_epoch[epoch])), step
    assert full.plateau.scale == pytest.approx(0.1)  # clamped at min_lr / learning_rate

    resumed = make(tmp_path, "resumed", **kw)
    state = resumed.resume_from_checkpoint(tmp_path / "full" / "ckpt" / "epoch_3")
    assert state["plateau"]["scale"] == pytest.approx(0.25)
    resumed.train()
    after = lr_curve(tmp_path, "resumed")
    assert sorted(after) == list(range(13, 21))
    for step, got in after.items():
        assert got == pytest.approx(curve[step], rel=1e-9), step


def test_plateau_without_validation_is_refused(tmp_path):
    from ds_trainer import ConfigError

    with pytest.raises(ConfigError, match="plateau scheduler follows it.*no validation set.*pass a val_loader"):
        make(tmp_path, val=False, scheduler="plateau").train()


def _params_after_one_update(tmp_path, name, batch_size, accumulation):
    trainer = make(
        tmp_path,
        name,
        batch_size=batch_size,
        grad_accumulation_steps=accumulation,
        optimizer_type="sgd",
        momentum=0.0,
        weight_decay=0.0,
        scheduler_type="none",
        clip_grad_norm=None,
        learning_rate=0.5,
        num_epochs=1,
        val=False,
    )
    trainer.train_loader = DataLoader(dataset(8), batch_size=batch_size, shuffle=False)
    trainer.train()
    assert trainer.engine.global_steps == 1
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_accumulation_equals_one_big_batch(tmp_path):
    torch.manual_seed(0)
    start = {n: p.detach().clone() for n, p in CLIPModel("tiny").named_parameters()}
    big = _params_after_one_update(tmp_path, "big", batch_size=8, accumulation=1)
    accumulated = _params_after_one_update(tmp_path, "acc", batch_size=4, accumulation=2)
    moved = max((big[n] - start[n]).abs().max().item() for n in big)
    assert moved > 1e-3  # the update is real, so the comparison below means something
    for n in big:
        torch.testing.assert_close(accumulated[n], big[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_every_optimizer_trains_at_every_zero_stage(tmp_path, optimizer, stage):
    trainer = make(
        tmp_path,
        optimizer_type=optimizer,
        zero_stage=stage,
        num_epochs=1,
        backbone_lr_scale=0.1,
        learning_rate=1e-2 if optimizer == "sgd" else 1e-3,
    )
    torch.manual_seed(0)
    trainer.setup()
    basic = trainer.engine.basic_optimizer
    assert type(basic).__name__.lower().replace("fused", "").startswith(optimizer.replace("adamw", "adam"))
    groups = {g["name"]: g for g in basic.param_groups}
    assert groups["head"]["weight_decay"] == 0.01 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    if optimizer == "sgd":
        assert groups["head"]["momentum"] == 0.9
    row = trainer.train()[0]
    assert math.isfinite(row["train_loss"])
    logged = steps(tmp_path)
    assert all(r["train/lr_backbone"] == pytest.approx(0.1 * r["train/lr"]) for r in logged)
    norms = [r["train/grad_norm"] for r in logged]
    assert len(norms) == STEPS_PER_EPOCH and all(math.isfinite(n) and n > 0 for n in norms)


def test_grad_norm_is_logged_before_clipping(tmp_path):
    # The same first step with and without clipping: the logged norm is the raw one both times.
    a = make(tmp_path, "a", clip_grad_norm=1e-3, num_epochs=1, zero_stage=0)
    a.train()
    b = make(tmp_path, "b", clip_grad_norm=None, num_epochs=1, zero_stage=0)
    b.train()
    first_a, first_b = steps(tmp_path, "a")[0], steps(tmp_path, "b")[0]
    assert first_a["train/grad_norm"] == pytest.approx(first_b["train/grad_norm"], rel=1e-5)
    assert first_a["train/grad_norm"] > 1e-3  # so the clip really cut it
    # and clipping changed the update: the second step's loss differs
    assert steps(tmp_path, "a")[1]["train/loss"] != pytest.approx(steps(tmp_path, "b")[1]["train/loss"], rel=1e-6)


def test_offload_optimizer_to_cpu_trains(tmp_path):
    trainer = make(tmp_path, zero_stage=2, num_epochs=1)
    trainer.cfg.deepspeed.offload_optimizer = "cpu"
    trainer.train()
    assert trainer.ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "CPUAdam" in type(trainer.engine.basic_optimizer).__name__
    assert math.isfinite(trainer.history[-1]["train_loss"])


def test_best_follows_monitor_and_keep_last_prunes(tmp_path, capsys):
    trainer = make(tmp_path, monitor="val_loss", num_epochs=4, keep_last=2, save_frequency=1, learning_rate=3e-3)
    rows = trainer.train()
    losses = [r["val_loss"] for r in rows]
    best_epoch = 1 + min(range(len(losses)), key=lambda i: (losses[i], i))
    ckpt = tmp_path / "run" / "ckpt"
    assert json.loads((ckpt / "best" / "ds_trainer.json").read_text())["epoch"] == best_epoch
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["best", "epoch_3", "epoch_4"]
    assert f"Best checkpoint: {ckpt / 'best'} (epoch {best_epoch}, val_loss" in capsys.readouterr().out


def test_early_stopping_on_min_delta(tmp_path):
    trainer = make(tmp_path, monitor="val_auc", min_delta=10.0, early_stopping=True, patience=2, num_epochs=10)
    rows = trainer.train()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    ckpt = tmp_path / "run" / "ckpt"
    assert (ckpt / "latest").read_text() == "epoch_3"
    assert json.loads((ckpt / "best" / "ds_trainer.json").read_text())["epoch"] == 1


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_mixed_precision_trains_with_fp32_master_weights(tmp_path, stage):
    trainer = make(tmp_path, precision="bf16", zero_stage=stage, num_epochs=1)
    trainer.train()
    assert trainer.engine.bfloat16_enabled() and trainer.input_dtype == torch.bfloat16
    assert next(trainer.model.parameters()).dtype == torch.bfloat16  # the compute copy
    norms = [r["train/grad_norm"] for r in steps(tmp_path)]
    assert len(norms) == STEPS_PER_EPOCH and all(math.isfinite(n) and n > 0 for n in norms)
    assert math.isfinite(trainer.history[0]["val_loss"])
