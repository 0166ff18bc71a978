"""Building the DeepSpeed engines, and the run settings derived on the way.

What a run derives from its config, its world and its loaders (the micro-batch a loader really
yields, the accumulation an elastic resume needs, ZeRO stage 0 for an engine without optimizer, the
monitor without a validation set) is a frozen `RunSettings`, never written back into the config: the
saved `config.yaml` and the checkpoint's config are what the user asked for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ds_trainer import optim
from ds_trainer.config import Config, TrainingSection
from ds_trainer.distributed import detect_device, reserve_cpu_threads
from ds_trainer.ds_compat import patch_universal_loading
from ds_trainer.ds_config import build_ds_config
from ds_trainer.ds_config import optimizer_steps_per_epoch as optim_steps_per_epoch
from ds_trainer.errors import ConfigError, TrainingError
from ds_trainer.resume import ResumePlan

log = logging.getLogger(__name__)


def select_device(request: str | None) -> None:
    """DeepSpeed picks its accelerator once, on first use: a requested CPU must be set before that."""
    if request is None:
        return
    kind = str(request).split(":")[0]
    if kind == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator once, on first use
    elif kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda', but no CUDA device is visible; use device='cpu' or None (auto)")


@dataclass(frozen=True)
class RunSettings:
    world_size: int
    batch_size: int  # micro-batch per rank: what the train loader yields
    grad_accumulation_steps: int
    zero_stage: int
    monitor: str
    steps_per_epoch: int = 0  # micro-batches per rank per epoch (0: evaluation only)
    universal: bool = False  # the engine loads a checkpoint through DeepSpeed's universal format
    split_groups: bool = False  # backbone and head in groups of their own (a v1 checkpoint's layout)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accumulation_steps * self.world_size


def micro_batch_size(t: TrainingSection, loader: Any) -> int:
    """The loader's batch size; an explicit training.batch_size that disagrees with it is an error."""
    loader_bs = getattr(loader, "batch_size", None)
    if loader_bs is None:
        return t.batch_size
    if "batch_size" in t.model_fields_set and loader_bs != t.batch_size:
        raise ConfigError(
            f"training.batch_size is {t.batch_size}, but train_loader yields batches of {loader_bs}; "
            "make them agree (DeepSpeed needs the true micro-batch size)"
        )
    return int(loader_bs)


def resolve_monitor(t: TrainingSection, has_val: bool) -> str:
    """Early stopping, `best` and plateau follow `training.monitor`; a val_* metric needs a val_loader."""
    if has_val or not t.monitor.startswith("val_"):
        return t.monitor
    if "monitor" in t.model_fields_set or t.scheduler == "plateau":
        why = " (the plateau scheduler follows it)" if t.scheduler == "plateau" else ""
        raise ConfigError(
            f"training.monitor is {t.monitor}{why}, but there is no validation set: set data.val_split "
            "or data.holdout_fraction (from Python: pass a val_loader), or monitor train_loss / train_acc"
        )
    log.info("no val_loader: monitoring train_loss instead of %s", t.monitor)
    return "train_loss"


def training_settings(
    cfg: Config, world_size: int, train_loader: Any, val_loader: Any, plan: ResumePlan
) -> RunSettings:
    t = cfg.training
    return RunSettings(
        world_size=world_size,
        batch_size=micro_batch_size(t, train_loader),
        grad_accumulation_steps=plan.grad_accumulation_steps or t.grad_accumulation_steps,
        zero_stage=cfg.deepspeed.zero_stage,
        monitor=resolve_monitor(t, val_loader is not None),
        steps_per_epoch=len(train_loader),
        universal=plan.universal,
        split_groups=plan.split_groups,
    )


def eval_settings(cfg: Config, world_size: int) -> RunSettings:
    # ZeRO 1/2 shard optimizer state, and an evaluation engine has none.
    stage = 0 if cfg.deepspeed.zero_stage in (1, 2) else cfg.deepspeed.zero_stage
    t = cfg.training
    return RunSettings(world_size, t.batch_size, t.grad_accumulation_steps, stage, t.monitor)


def effective_config(cfg: Config, s: RunSettings) -> Config:
    """A copy of `cfg` with the derived values, for the DeepSpeed JSON only."""
    copy = cfg.model_copy(deep=True)
    copy.training.batch_size = s.batch_size
    copy.training.grad_accumulation_steps = s.grad_accumulation_steps
    copy.training.monitor = s.monitor
    copy.deepspeed.zero_stage = s.zero_stage
    return copy


@dataclass
class Built:
    engine: Any
    ds_config: dict[str, Any]
    group_names: list[str]
    plateau: optim.PlateauScale | None = None


def build_training_engine(model: nn.Module, cfg: Config, s: RunSettings) -> Built:
    import deepspeed

    eff = effective_config(cfg, s)
    ds = build_ds_config(eff, s.world_size, s.steps_per_epoch, detect_device())
    if s.universal:
        ds["checkpoint"] = {"load_universal": True}
        patch_universal_loading()
    t = eff.training
    groups = optim.param_groups(model, t, split_parts=s.split_groups)
    lr_scheduler, plateau = None, None
    if t.scheduler in ("step", "plateau"):
        factor = optim.step_lr_factor(t, optim_steps_per_epoch(eff, s.steps_per_epoch))
        lr_scheduler = optim.make_lambda_scheduler(factor)
        if t.scheduler == "plateau":
            plateau = optim.PlateauScale(t, factor)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds, lr_scheduler=lr_scheduler)
    sched = engine.lr_scheduler
    if t.scheduler == "cosine" and getattr(sched, "last_batch_iteration", None) == -1:
        # WarmupCosineLR starts at iteration -1, where its LR is 0, and iteration 0 is 0 too
        # under a linear warmup: two wasted steps. Start at 1 so optimizer step n runs at
        # iteration n: warmup n/W, and the last step lands exactly on min_lr.
        sched.step(1)
    return Built(engine, ds, [g["name"] for g in groups], plateau)


def build_eval_engine(model: nn.Module, cfg: Config, s: RunSettings) -> Built:
    """An engine without optimizer, for a model with nothing to train (zero-shot CLIP) or to score."""
    import deepspeed

    ds = build_ds_config(effective_config(cfg, s), s.world_size, max(1, s.grad_accumulation_steps), detect_device())
    for key in ("optimizer", "scheduler", "gradient_clipping", "zero_allow_untested_optimizer"):
        ds.pop(key, None)
    ds["zero_optimization"].pop("offload_optimizer", None)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    return Built(engine, ds, [])


def require_training(trainable: bool, has_train_loader: bool, what: str) -> None:
    if trainable and not has_train_loader:
        raise ConfigError(f"{what}: needs a train_loader (evaluating a checkpoint: ds-trainer eval)")
    if not trainable:
        raise ConfigError(
            f"{what}: the model has no trainable parameters (mode zero-shot is evaluation only); "
            "call evaluate(), or train a fine-tune / prompt-tuning / LoRA model"
        )


def tune_cpu(loader_workers: int) -> None:
    """Steps on CPU: denormals flushed, and a core left to each loader worker."""
    # Near convergence Adam's moments underflow into denormals, which x86 CPUs process
    # ~100x slower (measured: 5 vs 350 samples/s on the tiny model); flush them to zero.
    torch.set_flush_denormal(True)
    threads = reserve_cpu_threads(loader_workers)
    if threads is not None:
        log.info("torch threads: %d (one core left to each train loader worker)", threads)


def describe(s: RunSettings, dtype: torch.dtype, model: nn.Module, group_names: list[str]) -> str:
    # ZeRO-3 has partitioned the parameters by now (numel 0 here); ds_numel keeps each one's full size.
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    return (
        f"world size {s.world_size}, {s.steps_per_epoch} micro-batches of {s.batch_size} per rank per epoch, "
        f"precision {dtype}, ZeRO stage {s.zero_stage}, {trainable} trainable parameters in groups "
        f"{', '.join(group_names)}"
    )


def ready(engine: Any, cfg: Any, device: torch.device, loader_workers: int) -> torch.dtype:
    """The engine made ready to step: CPU tuning, `model.compile`; returns the inputs' dtype."""
    if device.type == "cpu":
        tune_cpu(loader_workers)
    if cfg.model.compile:
        engine.compile()  # nn.Module.compile() in place: state_dict keys (and checkpoints) do not change
    return input_dtype(engine)


def input_dtype(engine: Any) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def check_weights_finite(engine: Any, world_size: int, tag: str, checkpoint_dir: str) -> None:
    """Never write (or call best) a checkpoint whose weights hold NaN/Inf."""
    # ZeRO-3: each rank checks its own partition (ds_tensor). One flag, one host sync.
    flags = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all() for p in engine.module.parameters()]
    bad = (~torch.stack(flags)).any().float().reshape(1) if flags else torch.zeros(1, device=engine.device)
    if world_size > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bool(bad.item()):
        raise TrainingError(
            f"not saving {tag}: the weights hold NaN/Inf (step {int(engine.global_steps)}). The last "
            f"complete checkpoint in {checkpoint_dir} is untouched; lower training.learning_rate and resume"
        )


def grad_norm_before_step(engine: Any, model: nn.Module, zero_stage: int) -> torch.Tensor | None:
    """ZeRO and the bf16 optimizer compute the global norm in step(); fp32 ZeRO-0 does not.

    There, gradients are already all-reduced after the boundary backward, so the norm over
    local `.grad` is the global one (before clipping, as DeepSpeed reports it).
    """
    if zero_stage != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return (
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else None
    )
