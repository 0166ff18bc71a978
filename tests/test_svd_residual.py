"""mode svd-residual (Effort, ICML 2025): decomposition, constraint losses, what trains, training, export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_config
from test_export import dataset, engine_logits, probe_batch
from test_launch_features import jsonl, launch
from torch import nn
from torch.utils.data import DataLoader

from ds_trainer.config import ModelSection, SvdResidualSection, build_config
from ds_trainer.errors import ConfigError
from ds_trainer.export import EXPORT_FILE, HEAD_FILE, export_checkpoint, load_exported
from ds_trainer.models import CLIPModel, build_model
from ds_trainer.models.svd_residual import SVDResidualCore, SVDResidualLinear, apply_svd_residual
from ds_trainer.trainer import Trainer

SVD = {"model_name": "tiny", "mode": "svd-residual"}
# ViT-L/14: 24 layers x 4 projections x (U_r 1024 + S_r 1 + Vh_r 1024) at r=1, plus the 1024x2 head + bias.
VITL14_TRAINABLE = 24 * 4 * (1024 + 1 + 1024) + 1024 * 2 + 2  # 198,754 (README states it)


def linear(m: int = 6, n: int = 5, dtype=torch.float64) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(n, m).to(dtype)


@pytest.mark.unit
def test_frozen_plus_residual_is_the_original_weight():
    lin = nn.Linear(64, 48)
    core = SVDResidualCore(lin, r=3)
    torch.testing.assert_close(core.merged_weight(), lin.weight.detach(), atol=1e-6, rtol=0)
    x = torch.randn(5, 64)
    module = SVDResidualLinear(lin, r=3)
    torch.testing.assert_close(module(x), lin(x), atol=1e-5, rtol=0)
    assert {n for n, _ in module.named_parameters()} == {"svd.U_r", "svd.S_r", "svd.Vh_r"}
    assert {"svd.weight_main", "svd.bias", "svd.u_main", "svd.vh_main"} <= {n for n, _ in module.named_buffers()}
    assert module.svd.U_r.shape == (48, 3) and module.svd.S_r.shape == (3,) and module.svd.Vh_r.shape == (3, 64)


@pytest.mark.unit
def test_constraint_losses_vanish_at_init_and_grow_when_the_residual_moves():
    core = SVDResidualCore(linear(), r=2).double()
    losses = core.constraint_losses(core.merged_weight())
    assert float(losses.detach().abs().max()) < 1e-6  # buffers are float32-rounded
    with torch.no_grad():
        core.S_r.mul_(2.0)
        core.U_r.add_(0.1)
    moved = core.constraint_losses(core.merged_weight()).detach()
    assert float(moved[0]) > 1e-3 and float(moved[1]) > 1e-3


@pytest.mark.unit
def test_constraint_losses_closed_form_and_gradcheck():
    core = SVDResidualCore(linear(), r=2).double()
    with torch.no_grad():  # away from the (non-differentiable) minimum
        core.U_r.add_(0.05 * torch.randn_like(core.U_r))
        core.Vh_r.add_(0.05 * torch.randn_like(core.Vh_r))
        core.S_r.mul_(1.3)
    u = torch.cat([core.u_main, core.U_r], 1)
    vh = torch.cat([core.vh_main, core.Vh_r], 0)
    eye = torch.eye(u.shape[1], dtype=torch.float64)
    w = core.merged_weight()
    expected = [
        0.5 * torch.linalg.matrix_norm(u.t() @ u - eye) + 0.5 * torch.linalg.matrix_norm(vh @ vh.t() - eye),
        (torch.linalg.matrix_norm(w) ** 2 - core.weight_norm_sq[0]).abs(),
    ]
    torch.testing.assert_close(core.constraint_losses(w), torch.stack(expected).detach())

    def f(ur, sr, vhr):
        for name, t in zip(("U_r", "S_r", "Vh_r"), (ur, sr, vhr)):
            core._parameters.pop(name, None)
            core.__dict__[name] = t  # plain tensors, so the gradient reaches gradcheck's inputs
        return core.constraint_losses(core.merged_weight())

    params = tuple(p.detach().clone().requires_grad_(True) for p in (core.U_r, core.S_r, core.Vh_r))
    assert torch.autograd.gradcheck(f, params)


@pytest.mark.unit
def test_constraint_gradient_is_finite_at_init():
    """||A||_F's derivative is 0/0 at A = 0: the loss must give a zero, not a NaN, gradient there."""
    core = SVDResidualCore(linear(8, 8), r=1).double()
    with torch.no_grad():
        core.u_main.zero_()
        core.vh_main.zero_()
        core.U_r.zero_()
        core.Vh_r.zero_()
        core.weight_norm_sq.zero_()
    core.constraint_losses(core.merged_weight()).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in core.parameters())


@pytest.mark.unit
def test_only_residuals_and_head_train_and_aux_loss_is_added():
    torch.manual_seed(0)
    model = build_model(ModelSection(**SVD))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") or n.rsplit(".", 1)[-1] in {"U_r", "S_r", "Vh_r"} for n in trainable)
    assert {n for n in trainable if n.startswith("head.")} == {"head.weight", "head.bias"}
    # 4 layers x 4 projections, each U_r (64) + S_r (1) + Vh_r (64), and the head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * 129 + 64 * 2 + 2
    model.train()
    out = model(torch.randn(2, 3, 224, 224))
    aux = model.auxiliary_loss()
    assert out.shape == (2, 2) and aux is not None and float(aux.detach()) < 1e-3
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert model.auxiliary_loss() is None  # evaluation computes no constraint losses
    assert CLIPModel(model_name="tiny").auxiliary_loss() is None


@pytest.mark.unit
def test_vitl14_trainable_count():
    """The count README states, on a real ViT-L/14 config (random init, no download)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768)  # fmt: skip
    with torch.device("meta"):
        tower = CLIPVisionModel(cfg)
    # The SVD needs real numbers: decompose layer 0's weights on CPU, count the rest from shapes.
    assert sum(p.numel() for p in tower.parameters()) > 300_000_000
    layer0 = nn.Linear(1024, 1024)
    core = SVDResidualCore(layer0, r=1)
    per_projection = sum(p.numel() for p in core.parameters())
    attn = [m for n, m in tower.named_modules() if n.endswith("self_attn")]
    count = len(attn) * len(SvdResidualSection().projections) * per_projection + (cfg.hidden_size * 2 + 2)
    assert count == VITL14_TRAINABLE == 198_754


@pytest.mark.unit
@pytest.mark.parametrize(
    "model, match",
    [
        ({"svd_residual": {"r": 0}}, "r"),
        ({"svd_residual": {"projections": ["fc1"]}}, "fc1 is not a self-attention projection"),
        ({"svd_residual": {"r": 64}}, "leave no frozen main part"),
        ({"freeze_backbone": True}, "contradict"),
        ({"lora": {"enabled": True}}, "contradict"),
        ({"gradient_checkpointing": True}, "not supported with mode svd-residual"),
    ],
)
def test_refusals(model, match):
    with pytest.raises(ConfigError, match=match):
        build_model(build_config({"model": {**SVD, **model}}).model)


@pytest.mark.unit
def test_python_api_takes_a_mapping():
    model = CLIPModel(model_name="tiny", mode="svd-residual", svd_residual={"r": 2, "projections": ["q_proj"]})
    attn = next(m for n, m in model.backbone.named_modules() if n.endswith("self_attn"))
    assert attn.q_proj.svd.S_r.shape == (2,) and isinstance(attn.k_proj, nn.Linear)
    with pytest.raises(ConfigError, match="model.svd_residual.r"):
        CLIPModel(model_name="tiny", mode="svd-residual", svd_residual={"r": 0})


@pytest.mark.unit
def test_unknown_projection_in_code():
    with pytest.raises(ConfigError, match="choose from q_proj"):
        apply_svd_residual(nn.Module(), 1, ["qkv"])


def train(tmp_path, zero_stage, lr=1e-2, precision="fp32"):
    cfg = build_config({
        "model": SVD,
        "training": {"num_epochs": 1, "batch_size": 8, "learning_rate": lr, "scheduler": "none",
                     "monitor": "train_loss", "checkpoint_dir": str(tmp_path / "ckpt")},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision},
        "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False},
    })  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if "weight_main" in n}
    trainer = Trainer(model, DataLoader(dataset(), batch_size=8), config=cfg, device="cpu")
    trainer.train()
    # bf16: DeepSpeed cast the frozen weights, which is no training step: compare in their dtype
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n].to(p.dtype))}
    assert changed and all(n.startswith("head.") or n.endswith(("U_r", "S_r", "Vh_r")) for n in changed)
    assert any(n.endswith("S_r") for n in changed), "the residuals train"
    for n, b in model.named_buffers():
        if n in buffers:
            assert b.dtype == torch.float32 and torch.equal(b.detach().cpu(), buffers[n]), f"{n} is frozen, in fp32"
    return trainer


@pytest.mark.unit
@pytest.mark.parametrize("stage", [0, 2])
def test_trains_in_process_and_export_merges(tmp_path, stage):
    trainer = train(tmp_path, stage)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["train_loss"])
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    info = json.loads((out / EXPORT_FILE).read_text())
    assert info["mode"] == "fine-tune" and info["trained_mode"] == "svd-residual" and info["svd_residual_merged"]

    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(out).eval()
    keys = set(tower.state_dict())
    assert any(k.endswith("encoder.layers.0.self_attn.q_proj.weight") for k in keys) and not any(
        "svd" in k for k in keys
    )
    head = load_file(str(out / HEAD_FILE))
    x = probe_batch()
    expected = engine_logits(trainer, x)
    with torch.no_grad():
        plain = tower(pixel_values=x).pooler_output @ head["weight"].t() + head["bias"]
    torch.testing.assert_close(plain, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(load_exported(out)(x), expected, atol=1e-4, rtol=0)


@pytest.mark.unit
def test_bf16_keeps_the_frozen_part_in_fp32_and_exports(tmp_path):
    """DeepSpeed casts the module to bf16; the SVD buffers must stay fp32 (the constraints need the precision)."""
    trainer = train(tmp_path, 2, precision="bf16")
    assert trainer.input_dtype == torch.bfloat16
    assert any(p.dtype == torch.bfloat16 for p in trainer.engine.module.parameters())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["train_loss"])
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")  # verifies the merged logits itself
    assert json.loads((out / EXPORT_FILE).read_text())["svd_residual_merged"]


# make test-slow (~1-4 min on 2 cores): the ZeRO-3 path is where partitioned parameters could break the
# constraint losses or the trainable count; in-process stages 0 and 2 above run in make test.
@pytest.mark.slow
def test_zero3_on_two_ranks(tmp_path, tiny_shards):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, model={"mode": "svd-residual"}, deepspeed={"zero_stage": 3},
                       training={"num_epochs": 1, "warmup_epochs": 0, "learning_rate": 1e-3})  # fmt: skip
    launch(cfg)
    rows = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"]) and math.isfinite(rows[0]["val_loss"])
    log = (tmp_path / "run" / "train.log").read_text()
    count = int(log.split(" trainable parameters in groups")[0].rsplit(", ", 1)[1])
    assert count == 16 * 129 + 64 * 2 + 2, "ZeRO-3's partitioned parameters are counted at full size"
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")  # consolidates the 2 ranks' partitions
    assert json.loads((out / EXPORT_FILE).read_text())["svd_residual_merged"]
