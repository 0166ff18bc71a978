"""Layer 1: the YAML → DeepSpeed JSON translation, value by value (no torch.distributed)."""

import json
import subprocess
import sys

import pytest

from ds_trainer.config import build_config
from ds_trainer.ds_config import DeviceInfo, build_ds_config, resolve_precision
from ds_trainer.errors import ConfigError

GPU = DeviceInfo(type="cuda", bf16_supported=True)
OLD_GPU = DeviceInfo(type="cuda", bf16_supported=False)
CPU = DeviceInfo(type="cpu", bf16_supported=False)


def cfg(**sections):
    return build_config(sections)


@pytest.mark.unit
def test_batch_sizes_and_accumulation():
    c = cfg(training={"batch_size": 32, "grad_accumulation_steps": 4})
    ds = build_ds_config(c, world_size=8, steps_per_epoch=100, device=GPU)
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 32 * 4 * 8


@pytest.mark.unit
def test_clipping_and_zero_stage():
    ds = build_ds_config(cfg(training={"clip_grad_norm": 0.5}, deepspeed={"zero_stage": 3}), 2, 10, GPU)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3}
    ds = build_ds_config(cfg(training={"clip_grad_norm": None}), 2, 10, GPU)
    assert "gradient_clipping" not in ds


@pytest.mark.unit
@pytest.mark.parametrize(
    "mixed, explicit, device, expected",
    [
        (True, "auto", GPU, "bf16"),
        (True, "auto", OLD_GPU, "fp16"),
        (False, "auto", GPU, "fp32"),
        (True, "auto", CPU, "fp32"),
        (True, "auto", DeviceInfo("cpu", True), "fp32"),
        (True, "fp32", GPU, "fp32"),
        (False, "bf16", GPU, "bf16"),
        (False, "fp16", GPU, "fp16"),
        (False, "bf16", CPU, "bf16"),
    ],
)
def test_precision_rules(mixed, explicit, device, expected):
    c = cfg(training={"mixed_precision": mixed}, deepspeed={"precision": explicit})
    assert resolve_precision(c, device) == expected
    ds = build_ds_config(c, 1, 10, device)
    assert ds.get("bf16", {}).get("enabled", False) == (expected == "bf16")
    assert ds.get("fp16", {}).get("enabled", False) == (expected == "fp16")


@pytest.mark.unit
def test_fp16_on_cpu_is_refused_with_advice():
    c = cfg(deepspeed={"precision": "fp16"})
    with pytest.raises(ConfigError, match="fp16 is not supported.*CPU.*bf16 or fp32"):
        build_ds_config(c, 1, 10, CPU)


@pytest.mark.unit
@pytest.mark.parametrize("name, ds_type", [("adamw", "AdamW"), ("adam", "Adam")])
def test_adam_family(name, ds_type):
    ds = build_ds_config(cfg(training={"optimizer": name, "learning_rate": 3e-4, "weight_decay": 0.1}), 1, 10, GPU)
    assert ds["optimizer"] == {"type": ds_type, "params": {"lr": 3e-4, "weight_decay": 0.1}}
    assert "zero_allow_untested_optimizer" not in ds


@pytest.mark.unit
def test_sgd_momentum_and_zero_allowance():
    c = cfg(training={"optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.8, "weight_decay": 0.0})
    ds = build_ds_config(c, 1, 10, GPU)
    assert ds["optimizer"] == {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.0}}
    assert "zero_allow_untested_optimizer" not in ds
    c = cfg(training={"optimizer": "sgd"}, deepspeed={"zero_stage": 2})
    assert build_ds_config(c, 1, 10, GPU)["zero_allow_untested_optimizer"] is True


@pytest.mark.unit
def test_warmup_cosine_schedule():
    c = cfg(
        training={
            "learning_rate": 1e-4,
            "min_lr": 1e-6,
            "num_epochs": 10,
            "warmup_epochs": 1,
            "grad_accumulation_steps": 4,
            "scheduler": "cosine",
        }
    )
    ds = build_ds_config(c, world_size=8, steps_per_epoch=100, device=GPU)
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    p = ds["scheduler"]["params"]
    assert p["total_num_steps"] == 25 * 10  # 100 micro-batches / 4 accumulation per epoch
    assert p["warmup_num_steps"] == 25
    assert p["cos_min_ratio"] == pytest.approx(0.01)
    assert p["warmup_type"] == "linear"
    assert p["warmup_min_ratio"] == 0.0


@pytest.mark.unit
def test_fractional_warmup_and_no_scheduler():
    c = cfg(training={"num_epochs": 4, "warmup_epochs": 0.5})
    assert build_ds_config(c, 1, 10, GPU)["scheduler"]["params"]["warmup_num_steps"] == 5
    assert "scheduler" not in build_ds_config(cfg(training={"scheduler": "none"}), 1, 10, GPU)


@pytest.mark.unit
def test_no_warmup_starts_at_full_lr():
    p = build_ds_config(cfg(training={"warmup_epochs": 0}), 1, 10, GPU)["scheduler"]["params"]
    assert (p["warmup_num_steps"], p["warmup_min_ratio"]) == (1, 1.0)


@pytest.mark.unit
def test_bad_world_and_steps():
    with pytest.raises(ConfigError, match="world size"):
        build_ds_config(cfg(), 0, 10, GPU)
    with pytest.raises(ConfigError, match="steps per epoch"):
        build_ds_config(cfg(), 1, 0, GPU)
    with pytest.raises(ConfigError, match="grad_accumulation_steps"):
        build_ds_config(cfg(training={"grad_accumulation_steps": 8}), 1, 4, GPU)


def write_json(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.unit
def test_user_json_merges_extra_keys_and_accepts_agreement(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": 32,
        "train_batch_size": "auto",
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "activation_checkpointing": {"partition_activations": False},
    }
    c = cfg(training={"batch_size": 32}, deepspeed={"zero_stage": 2, "config_file": write_json(tmp_path, user)})
    ds = build_ds_config(c, 2, 10, GPU)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["activation_checkpointing"] == {"partition_activations": False}
    assert ds["train_batch_size"] == 64


@pytest.mark.unit
def test_user_json_mismatches_all_listed(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": 3},
        "gradient_clipping": 2.0,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
    }
    c = cfg(
        training={"batch_size": 32, "learning_rate": 1e-3},
        deepspeed={"zero_stage": 1, "config_file": write_json(tmp_path, user)},
    )
    with pytest.raises(ConfigError) as exc:
        build_ds_config(c, 2, 10, GPU)
    msg = str(exc.value)
    for key in (
        "train_micro_batch_size_per_gpu",
        "zero_optimization.stage",
        "gradient_clipping",
        "optimizer.type",
        "optimizer.params.lr",
    ):
        assert key in msg


@pytest.mark.unit
def test_user_json_precision_contradiction(tmp_path):
    c = cfg(deepspeed={"precision": "fp32", "config_file": write_json(tmp_path, {"bf16": {"enabled": True}})})
    with pytest.raises(ConfigError, match="precision: JSON enables bf16, YAML gives fp32"):
        build_ds_config(c, 1, 10, GPU)


@pytest.mark.unit
def test_user_json_missing_or_invalid(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_ds_config(cfg(deepspeed={"config_file": str(tmp_path / "nope.json")}), 1, 10, GPU)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,,}')
    with pytest.raises(ConfigError, match="line 1"):
        build_ds_config(cfg(deepspeed={"config_file": str(bad)}), 1, 10, GPU)


def test_cli_prints_json_for_demo_config():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ds_trainer",
            "ds-config",
            "--config",
            "ds_configs/demo.yaml",
            "--world-size",
            "8",
            "--steps-per-epoch",
            "100",
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    ds = json.loads(out.stdout)
    assert ds["train_batch_size"] == 32 * 1 * 8
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["scheduler"]["params"]["total_num_steps"] == 100 * 6
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 100
    assert ds["scheduler"]["params"]["cos_min_ratio"] == pytest.approx(1e-5 / 1e-3)


def test_cli_user_error_exit_code_and_no_traceback():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ds_trainer",
            "ds-config",
            "--config",
            "ds_configs/demo.yaml",
            "--world-size",
            "2",
            "--steps-per-epoch",
            "10",
            "--set",
            "training.learnig_rate=1",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "did you mean training.learning_rate?" in out.stderr
    assert "Traceback" not in out.stderr
