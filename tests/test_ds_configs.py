"""Every shipped run config in ds_configs/: it loads, derives the DeepSpeed JSON an 8-GPU node
should get, and builds a model whose trainable parameters match its strategy.

Parametrized over a glob, so a new ds_configs/*.yaml is covered without editing this file; the
files listed in EXPECTED are also pinned to the values their comments promise. No download:
hub ids are swapped for the built-in random-init "tiny" CLIP (conftest sets HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_trainer.config import Config, load_config
from ds_trainer.ds_config import DeviceInfo, build_ds_config, optimizer_steps_per_epoch

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "ds_configs").glob("*.yaml")) + sorted((REPO / "ds_configs" / "recipes").glob("*.yaml"))
WORLD_SIZE = 8
STEPS_PER_EPOCH = 1000
GPU = DeviceInfo(type="cuda", bf16_supported=True)

# What each recipe promises (its header comment and key comments).
EXPECTED = {
    "demo.yaml": dict(micro=32, accum=1, zero=1, offload=None, scheduler="cosine", clip=1.0, strategy="full"),
    "genimage_sdv14_vitb32.yaml": dict(
        micro=64, accum=1, zero=2, offload=None, scheduler="cosine", clip=1.0, strategy="full",
        model="openai/clip-vit-base-patch32",
    ),
    "genimage_sdv14_linear_probe.yaml": dict(
        micro=128, accum=1, zero=1, offload=None, scheduler="plateau", clip=1.0, strategy="probe",
        model="openai/clip-vit-base-patch32",
    ),
    "lora_vitl14.yaml": dict(
        micro=32, accum=2, zero=1, offload=None, scheduler="cosine", clip=1.0, strategy="lora",
        model="openai/clip-vit-large-patch14",
    ),
    # the papers' global batches: UnivFD 256, CoOp 32 (headers say how they map to 8 GPUs)
    "univfd_vitl14_linear_probe.yaml": dict(
        micro=32, accum=1, zero=1, offload=None, scheduler="plateau", clip=None, strategy="probe",
        model="openai/clip-vit-large-patch14", global_batch=256,
    ),
    "coop_vitl14.yaml": dict(
        micro=4, accum=1, zero=1, offload=None, scheduler="cosine", clip=1.0, strategy="prompt-tuning",
        model="openai/clip-vit-large-patch14", global_batch=32,
    ),
    "zero3_offload.yaml": dict(
        micro=16, accum=4, zero=3, offload="cpu", scheduler="cosine", clip=1.0, strategy="full",
        model="openai/clip-vit-large-patch14",
    ),
}  # fmt: skip

# Native input resolution of the CLIP checkpoints the recipes use.
NATIVE_SIZE = {
    "openai/clip-vit-base-patch32": 224,
    "openai/clip-vit-base-patch16": 224,
    "openai/clip-vit-large-patch14": 224,
    "openai/clip-vit-large-patch14-336": 336,
}


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def strategy_of(cfg: Config) -> str:
    m = cfg.model
    if m.mode != "fine-tune":
        return m.mode
    if m.lora.enabled:
        return "lora"
    return "probe" if m.freeze_backbone else "full"


def test_expected_files_exist():
    """EXPECTED pins real files (a rename must update it); the glob found them all."""
    names = set(ids(CONFIGS))
    assert set(EXPECTED) <= names, f"missing: {set(EXPECTED) - names}"


@pytest.fixture(params=CONFIGS, ids=ids(CONFIGS))
def path(request) -> Path:
    return request.param


def test_loads_and_header_says_how_to_launch(path):
    cfg = load_config(path)
    assert cfg.name == path.stem, "name doubles as the W&B run name and results folder"
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines[: next(i for i, text in enumerate(lines) if not text.startswith("#"))])
    assert header, "a config starts with a comment saying what it is for"
    assert f"--config {path.relative_to(REPO)}" in header, "the header must say how to launch it"


def test_ds_config_for_an_8_gpu_node(path):
    cfg = load_config(path)
    t = cfg.training
    ds = build_ds_config(cfg, world_size=WORLD_SIZE, steps_per_epoch=STEPS_PER_EPOCH, device=GPU)

    # Derived from the YAML, for any config in the folder.
    assert ds["train_micro_batch_size_per_gpu"] == t.batch_size
    assert ds["gradient_accumulation_steps"] == t.grad_accumulation_steps
    assert ds["train_batch_size"] == t.batch_size * t.grad_accumulation_steps * WORLD_SIZE
    assert ds["bf16"] == {"enabled": True}, "precision auto + mixed_precision on an Ampere+ GPU is bf16"
    assert "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["optimizer"]["params"]["lr"] == t.learning_rate
    if t.clip_grad_norm is None:
        assert "gradient_clipping" not in ds
    else:
        assert ds["gradient_clipping"] == t.clip_grad_norm
    if cfg.deepspeed.offload_optimizer == "none":
        assert "offload_optimizer" not in ds["zero_optimization"]
    else:
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    if t.scheduler == "cosine":
        per_epoch = optimizer_steps_per_epoch(cfg, STEPS_PER_EPOCH)
        params = ds["scheduler"]["params"]
        assert ds["scheduler"]["type"] == "WarmupCosineLR"
        assert params["total_num_steps"] == per_epoch * t.num_epochs
        assert params["warmup_num_steps"] == max(1, round(t.warmup_epochs * per_epoch))
        assert params["cos_min_ratio"] == pytest.approx(t.min_lr / t.learning_rate)
    else:
        assert "scheduler" not in ds, "step/plateau/none run outside DeepSpeed's JSON"

    # Pinned values for the shipped recipes.
    exp = EXPECTED.get(path.name)
    if exp is None:
        return
    assert ds["train_micro_batch_size_per_gpu"] == exp["micro"]
    assert ds["gradient_accumulation_steps"] == exp["accum"]
    assert ds["train_batch_size"] == exp["micro"] * exp["accum"] * WORLD_SIZE
    assert ds["zero_optimization"]["stage"] == exp["zero"]
    assert ds.get("gradient_clipping") == exp["clip"]
    if "global_batch" in exp:
        assert ds["train_batch_size"] == exp["global_batch"]
    assert t.scheduler == exp["scheduler"]
    assert ("scheduler" in ds) == (exp["scheduler"] == "cosine")
    if exp["offload"] is None:
        assert "offload_optimizer" not in ds["zero_optimization"]
    else:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == exp["offload"]


def test_genimage_recipes_are_consistent(path):
    """The GenImage recipes train on SD v1.4's shards and validate across generators."""
    cfg = load_config(path)
    exp = EXPECTED.get(path.name, {})
    if "model" in exp:
        assert cfg.model.model_name == exp["model"]
    if not cfg.model.model_name.startswith("openai/"):
        return
    assert cfg.data.shards == "data_shards/genimage"
    assert cfg.data.train_generators == ["stable_diffusion_v_1_4"]
    assert cfg.data.val_split == "val"
    assert cfg.data.image_size == NATIVE_SIZE.get(cfg.model.model_name, cfg.data.image_size)
    assert cfg.deepspeed.precision == "auto" and cfg.training.mixed_precision
    assert cfg.training.checkpoint_dir.startswith(cfg.logging.run_dir)
    assert cfg.training.monitor == "val_auc"


def test_demo_is_tiny_on_demo_shards():
    cfg = load_config(REPO / "ds_configs" / "demo.yaml")
    assert cfg.model.model_name == "tiny"
    assert cfg.data.shards == "data_shards/demo"


def test_model_trains_what_the_strategy_says(path):
    """Built with the tiny CLIP instead of the hub id: the same strategy, no download."""
    from ds_trainer.models import build_model

    cfg = load_config(path, overrides=["model.model_name=tiny"])
    strategy = strategy_of(cfg)
    exp = EXPECTED.get(path.name)
    if exp is not None:
        assert strategy == exp["strategy"]
    model = build_model(cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    head = {n for n in trainable | frozen if n.startswith("head.")}
    if strategy != "prompt-tuning":  # CoOp scores text prompts: no head
        assert head and head <= trainable, "the linear head always trains"
    if strategy == "full":
        assert not frozen
    elif strategy == "probe":
        assert trainable == head
    elif strategy == "lora":
        lora = trainable - head
        assert lora and all("lora_" in n for n in lora), sorted(lora - {n for n in lora if "lora_" in n})
        assert not any("lora_" in n for n in frozen)
        for target in cfg.model.lora.target_modules:
            assert any(f".{target}.lora_A." in n for n in lora), f"no adapter on {target}"
            assert any(f".{target}.lora_B." in n for n in lora), f"no adapter on {target}"
        assert any(n.endswith("q_proj.base_layer.weight") for n in frozen), "pretrained weights stay frozen"
    elif strategy == "prompt-tuning":
        assert trainable == {"prompt_ctx"}
        assert model.prompt_ctx.shape[0] == cfg.model.prompt_length
    elif strategy == "svd-residual":
        residual = trainable - head
        assert residual and all(n.rsplit(".", 1)[-1] in {"U_r", "S_r", "Vh_r"} for n in residual)
        for proj in cfg.model.svd_residual.projections:  # its frozen main part is a buffer, not a parameter
            assert any(f".{proj}.svd.S_r" in n for n in residual) and not any(f".{proj}." in n for n in frozen)
    else:
        pytest.fail(f"{path.name}: no trainable-parameter check for strategy {strategy}")
