"""Layer 1: parameter groups and LR factors as pure functions (no DeepSpeed)."""

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from ds_trainer import CLIPModel
from ds_trainer.checkpoint import MARKER, prune
from ds_trainer.config import build_config
from ds_trainer.optim import LrFactor, PlateauScale, param_groups, step_lr_factor

pytestmark = pytest.mark.unit


def training(**kw):
    return build_config({"training": kw}).training


def test_param_groups_split_decay_and_backbone_lr():
    model = CLIPModel("tiny")
    groups = {g["name"]: g for g in param_groups(model, training(learning_rate=1e-3, backbone_lr_scale=0.1))}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    for name, group in groups.items():
        assert group["lr"] == pytest.approx(1e-4 if name.startswith("backbone") else 1e-3)
        assert group["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.01)
        for p in group["params"]:
            assert (p.ndim < 2) == name.endswith("no_decay"), names[id(p)]
            assert names[id(p)].startswith("backbone.") == name.startswith("backbone"), names[id(p)]
    # Every trainable parameter is in exactly one group; biases and LayerNorm weights decay-free.
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    no_decay = {names[id(p)] for p in groups["backbone_no_decay"]["params"]}
    assert "backbone.post_layernorm.weight" in no_decay or any("layer_norm" in n for n in no_decay)
    assert "head.bias" in {names[id(p)] for p in groups["head_no_decay"]["params"]}


def test_equal_lr_and_decay_share_a_group():
    # backbone_lr_scale 1: two groups, not four (DeepSpeed's ZeRO optimizer pays per group and step).
    model = CLIPModel("tiny")
    groups = param_groups(model, training(learning_rate=1e-3))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("all", 1e-3, 0.01),
        ("all_no_decay", 1e-3, 0.0),
    ]
    grouped = [[n for n, p in model.named_parameters() if any(p is q for q in g["params"])] for g in groups]
    assert "head.weight" in grouped[0] and "head.bias" in grouped[1]
    assert sum(map(len, grouped)) == len(list(model.parameters()))


def test_frozen_backbone_leaves_head_groups_only():
    groups = param_groups(CLIPModel("tiny", freeze_backbone=True), training())
    assert [g["name"] for g in groups] == ["head", "head_no_decay"]


def test_step_factor_follows_formula_with_warmup():
    f = step_lr_factor(training(scheduler="step", step_size=2, gamma=0.5, warmup_epochs=1, num_epochs=6), 4)
    for k in range(24):
        warm = (k + 1) / 4 if k < 4 else 1.0
        assert f(k) == pytest.approx(warm * 0.5 ** (k // 8)), k


def test_plateau_scale_reduces_on_no_improvement_and_round_trips():
    t = training(
        scheduler="plateau", plateau_factor=0.5, plateau_patience=1, monitor="val_loss", min_lr=1e-6, learning_rate=1e-3
    )
    factor = LrFactor("plateau", steps_per_epoch=3, warmup_steps=0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = LambdaLR(opt, factor)
    plateau = PlateauScale(t, factor)
    reduced = [plateau.step(m, sched) for m in (1.0, 0.9, 0.95, 0.96, 0.8, float("nan"), 0.85)]
    # patience 1: the second epoch in a row without improvement reduces the LR.
    assert reduced == [False, False, False, True, False, False, True]
    assert plateau.scale == pytest.approx(0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)  # reapplied at once, not one step later
    state = plateau.state_dict()

    factor2 = LrFactor("plateau", steps_per_epoch=3, warmup_steps=0)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched2 = LambdaLR(opt2, factor2)
    plateau2 = PlateauScale(t, factor2)
    plateau2.load_state_dict(state, sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert [plateau.step(m, sched) for m in (0.9, 0.9)] == [plateau2.step(m, sched2) for m in (0.9, 0.9)]
    assert plateau2.scale == plateau.scale


def test_plateau_scale_stops_at_min_lr():
    t = training(scheduler="plateau", plateau_factor=0.1, plateau_patience=0, learning_rate=1e-3, min_lr=1e-5)
    factor = LrFactor("plateau", 1, 0)
    sched = LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), factor)
    plateau = PlateauScale(t, factor)
    for m in (0.9, 0.8, 0.7, 0.6, 0.5):  # val_auc going down: never an improvement after the first
        plateau.step(m, sched)
    assert plateau.scale == pytest.approx(0.01)
    assert math.isclose(sched.optimizer.param_groups[0]["lr"], 1e-5)


def test_prune_keeps_newest_best_and_latest(tmp_path):
    for tag in ("epoch_1", "epoch_2", "epoch_3", "epoch_10", "best", "epoch_4"):
        (tmp_path / tag).mkdir()
        if tag != "epoch_4":  # epoch_4 is incomplete: a crashed save, left alone
            (tmp_path / tag / MARKER).write_text("{}")
    (tmp_path / "latest").write_text("epoch_2")  # e.g. a resumed run re-pointed latest
    deleted = prune(tmp_path, keep_last=1)
    assert sorted(d.name for d in deleted) == ["epoch_1", "epoch_3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "epoch_10", "epoch_2", "epoch_4", "latest"]
