"""YAML config → DeepSpeed JSON, as a pure function.

This replaces the hard-coded `train_batch_size` dicts of DeepSpeed's examples: the global batch,
precision, ZeRO stage, optimizer and WarmupCosine schedule all follow from the YAML, the world
size and the number of micro-batches per epoch, so they cannot drift apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_trainer.config import Config
from ds_trainer.errors import ConfigError

_OPTIMIZER_TYPES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


@dataclass(frozen=True)
class DeviceInfo:
    """What the precision choice depends on; `detect_device()` in distributed.py fills it in."""

    type: str = "cpu"  # "cuda", "cpu", ...
    bf16_supported: bool = False  # native bf16: Ampere+ on GPU, AVX-512 BF16/AMX on CPU


def resolve_precision(cfg: Config, device: DeviceInfo) -> str:
    """bf16 | fp16 | fp32, by the rules in README's config reference."""
    explicit = cfg.deepspeed.precision
    if explicit != "auto":
        precision = explicit
    elif not cfg.training.mixed_precision:
        precision = "fp32"
    elif device.type == "cpu":
        # bf16 runs on any x86 CPU, but without AVX-512 BF16/AMX it is many times slower than
        # fp32, and CPU runs are mostly tests and demos that should match across machines:
        # bf16 on a CPU is opt-in (deepspeed.precision: bf16).
        precision = "fp32"
    else:
        precision = "bf16" if device.bf16_supported else "fp16"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(
            "deepspeed.precision: fp16 is not supported by DeepSpeed on CPU "
            '("Type fp16 is not supported on your device"); use bf16 or fp32'
        )
    return precision


def optimizer_steps_per_epoch(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps in one epoch of `steps_per_epoch` micro-batches (per rank)."""
    return max(1, steps_per_epoch // cfg.training.grad_accumulation_steps)


def build_ds_config(
    cfg: Config,
    world_size: int,
    steps_per_epoch: int,
    device: DeviceInfo = DeviceInfo(),
) -> dict[str, Any]:
    """The DeepSpeed JSON dict for this run, merged with `deepspeed.config_file` if given."""
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1, got {world_size}")
    if steps_per_epoch < 1:
        raise ConfigError(f"steps per epoch must be at least 1, got {steps_per_epoch}")
    t = cfg.training
    if steps_per_epoch < t.grad_accumulation_steps:
        raise ConfigError(
            f"training.grad_accumulation_steps ({t.grad_accumulation_steps}) exceeds the "
            f"{steps_per_epoch} micro-batches per rank in one epoch: no optimizer step would happen"
        )
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accumulation_steps,
        "train_batch_size": t.batch_size * t.grad_accumulation_steps * world_size,
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step prints would duplicate it
        "wall_clock_breakdown": False,
        "zero_optimization": _zero(cfg, device),
        "optimizer": _optimizer(cfg),
    }
    if t.clip_grad_norm is not None:
        ds["gradient_clipping"] = t.clip_grad_norm
    precision = resolve_precision(cfg, device)
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    if t.optimizer == "sgd" and cfg.deepspeed.zero_stage > 0:
        # DeepSpeed only vouches for Adam-family optimizers under ZeRO; SGD works but must be allowed.
        ds["zero_allow_untested_optimizer"] = True
    scheduler = _scheduler(cfg, steps_per_epoch)
    if scheduler is not None:
        ds["scheduler"] = scheduler
    if cfg.deepspeed.config_file:
        ds = merge_user_config(ds, load_user_config(cfg.deepspeed.config_file))
    return ds


def _zero(cfg: Config, device: DeviceInfo) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer != "none":
        # Pinned host memory speeds up GPU<->CPU copies; on a CPU-only run there is nothing to pin.
        zero["offload_optimizer"] = {"device": cfg.deepspeed.offload_optimizer, "pin_memory": device.type == "cuda"}
    return zero


def _optimizer(cfg: Config) -> dict[str, Any]:
    t = cfg.training
    params: dict[str, Any] = {"lr": t.learning_rate, "weight_decay": t.weight_decay}
    if t.optimizer == "sgd":
        params["momentum"] = t.momentum
    return {"type": _OPTIMIZER_TYPES[t.optimizer], "params": params}


def _scheduler(cfg: Config, steps_per_epoch: int) -> dict[str, Any] | None:
    t = cfg.training
    if t.scheduler != "cosine":
        return None  # step and plateau run as a LambdaLR the Trainer hands to deepspeed.initialize (optim.py)
    per_epoch = optimizer_steps_per_epoch(cfg, steps_per_epoch)
    total = per_epoch * t.num_epochs
    warmup = round(t.warmup_epochs * per_epoch)
    return {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": total,
            # DeepSpeed requires at least one warmup step; "no warmup" is a warmup that starts at full LR.
            "warmup_num_steps": max(1, warmup),
            "warmup_min_ratio": 0.0 if warmup > 0 else 1.0,
            "cos_min_ratio": t.min_lr / t.learning_rate,
            "warmup_type": "linear",  # DeepSpeed defaults to log warmup; the seed means linear
        },
    }


def load_user_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file: {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config_file: {path} line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config_file: {path} must hold a JSON object")
    return data


def merge_user_config(derived: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """Keys only the user sets are kept; keys both set must agree ("auto" defers to the YAML).

    A silent pick between two sources is how a run ends up with a batch size nobody chose,
    so every disagreement is listed and the run refuses to start.
    """
    mismatches: list[str] = []
    ours, theirs = _precision_of(derived), _precision_of(user)
    if theirs is not None and theirs != ours:
        mismatches.append(f"precision: JSON enables {theirs}, YAML gives {ours or 'fp32'}")
    merged = _merge(dict(derived), user, "", mismatches)
    if mismatches:
        lines = "\n".join(f"  {m}" for m in mismatches)
        raise ConfigError(
            "deepspeed.config_file disagrees with the YAML config:\n"
            f"{lines}\nchange one of them so they agree, or remove the key from the JSON"
        )
    return merged


def _precision_of(ds: Mapping[str, Any]) -> str | None:
    """ "bf16"/"fp16" when a section enables it, None when none does."""
    for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        section = ds.get(key)
        if isinstance(section, Mapping) and section.get("enabled") not in (False, "auto", None):
            return name
    return None


def _merge(ours: dict[str, Any], theirs: Mapping[str, Any], prefix: str, out: list[str]) -> dict[str, Any]:
    for key, value in theirs.items():
        path = f"{prefix}{key}"
        if value == "auto":
            continue
        if key not in ours:
            ours[key] = value
        elif isinstance(ours[key], dict) and isinstance(value, Mapping):
            ours[key] = _merge(dict(ours[key]), value, path + ".", out)
        elif not _same(ours[key], value):
            out.append(f"{path}: JSON has {json.dumps(value)}, YAML gives {json.dumps(ours[key])}")
    return ours


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b
