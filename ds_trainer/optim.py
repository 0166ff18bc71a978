"""Parameter groups and the LR schedules DeepSpeed's JSON cannot express.

Parameter groups follow the usual practice: biases and norm weights (every tensor with fewer
than two dimensions) get no weight decay, and parameters of the CLIP towers (any name with a
`backbone` component) get `learning_rate * backbone_lr_scale`; groups with the same LR and decay
are one group.

Schedules, in optimizer steps (one per `grad_accumulation_steps` micro-batches):
- `cosine` is DeepSpeed's own `WarmupCosineLR`, set in the JSON (see ds_config.py).
- `step` and `plateau` are a `LambdaLR` handed to `deepspeed.initialize`, which steps it inside
  `engine.step()` and saves it in the checkpoint. Its factor is a linear warmup (step k of the
  warmup runs at (k+1)/W of the LR) times `gamma ** (epoch // step_size)` for `step`, or times
  the plateau scale for `plateau`.
- The plateau scale comes from torch's `ReduceLROnPlateau`, driven once per epoch by the
  all-rank validation metric (DeepSpeed would feed a plateau scheduler the batch size). It runs
  on a one-parameter proxy optimizer whose LR *is* the scale, so warmup, per-group LRs and the
  reduction compose, and its state travels in the checkpoint's client state.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from ds_trainer.config import TrainingSection

log = logging.getLogger(__name__)


def is_backbone(name: str) -> bool:
    return "backbone" in name.split(".")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias")


def param_groups(model: nn.Module, t: TrainingSection, split_parts: bool = False) -> list[dict[str, Any]]:
    """The trainable parameters in groups by (LR, weight decay): no decay on biases and norms, and
    the backbone at `learning_rate * backbone_lr_scale`.

    With `backbone_lr_scale` 1 the backbone and head share a group (named `all` when both are in
    it): two groups instead of four, because DeepSpeed's ZeRO optimizer pays per group and step (a
    norm, a flatten and an Adam kernel each; measured ~5 % of a small model's step on CPU).
    """
    # split_parts: backbone and head apart even at the same LR (checkpoints of ds_trainer before the merge).
    split = split_parts or t.backbone_lr_scale != 1.0
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    parts: dict[tuple[bool, bool], set[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone, no_decay = is_backbone(name), no_weight_decay(name, param)
        key = (backbone and split, no_decay)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "params": [],
                "lr": t.learning_rate * (t.backbone_lr_scale if backbone and split else 1.0),
                "weight_decay": 0.0 if no_decay else t.weight_decay,
            }
        group["params"].append(param)
        parts.setdefault(key, set()).add("backbone" if backbone else "head")
    for key, group in groups.items():
        part = "all" if len(parts[key]) > 1 else next(iter(parts[key]))
        group["name"] = part + ("_no_decay" if key[1] else "")
    return [groups[k] for k in sorted(groups)]


class LrFactor:
    """The LR multiplier at optimizer step k (0-based): warmup x step decay x plateau scale.

    A callable object rather than a closure so that LambdaLR's state_dict (saved by DeepSpeed
    in every checkpoint) carries its numbers.
    """

    def __init__(self, kind: str, steps_per_epoch: int, warmup_steps: int, step_size: int = 1, gamma: float = 1.0):
        self.kind = kind
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = warmup_steps
        self.step_size = step_size
        self.gamma = gamma
        self.scale = 1.0  # set by PlateauScale

    def __call__(self, k: int) -> float:
        warmup = (k + 1) / self.warmup_steps if k < self.warmup_steps else 1.0
        if self.kind == "step":
            return warmup * self.gamma ** (k // (self.steps_per_epoch * self.step_size))
        return warmup * self.scale


def step_lr_factor(t: TrainingSection, steps_per_epoch: int) -> LrFactor:
    warmup = round(t.warmup_epochs * steps_per_epoch)
    if t.scheduler == "step":
        return LrFactor("step", steps_per_epoch, warmup, t.step_size, t.gamma)
    return LrFactor("plateau", steps_per_epoch, warmup)


def make_lambda_scheduler(factor: LrFactor):
    """The callable `deepspeed.initialize(lr_scheduler=...)` calls with its torch optimizer."""

    def build(optimizer: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, factor)

    return build


class PlateauScale:
    """ReduceLROnPlateau on the validation metric, applied as a scale on every param group's LR."""

    def __init__(self, t: TrainingSection, factor: LrFactor) -> None:
        self.factor = factor
        self._proxy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.scheduler = ReduceLROnPlateau(
            self._proxy,
            mode="max" if t.monitor_higher_is_better else "min",
            factor=t.plateau_factor,
            patience=t.plateau_patience,
            threshold=t.min_delta,
            threshold_mode="abs",
            min_lr=t.min_lr / t.learning_rate,
        )

    @property
    def scale(self) -> float:
        return float(self._proxy.param_groups[0]["lr"])

    def step(self, metric: float, lr_scheduler: LambdaLR) -> bool:
        """Feed one epoch's metric; returns True when the LR was reduced.

        A NaN metric (e.g. AUC of a one-class validation set) counts as no improvement: every
        comparison with NaN is false in ReduceLROnPlateau.
        """
        before = self.scale
        self.scheduler.step(metric)
        self.factor.scale = self.scale
        reapply(lr_scheduler)
        return self.scale < before

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "scale": self.scale}

    def restore(self, state: dict[str, Any] | None, lr_scheduler: LambdaLR) -> None:
        """A resume: the checkpoint's plateau state, or a fresh start (with a warning) if it has none."""
        if state:
            self.load_state_dict(state, lr_scheduler)
        else:
            log.warning("the checkpoint has no plateau scheduler state; the plateau scheduler starts afresh")

    def load_state_dict(self, state: dict[str, Any], lr_scheduler: LambdaLR) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self._proxy.param_groups[0]["lr"] = float(state["scale"])
        self.factor.scale = self.scale
        reapply(lr_scheduler)


def reapply(lr_scheduler: LambdaLR) -> None:
    """Set every group's LR for the next optimizer step from the (changed) factor.

    LambdaLR computed the next step's LR at the end of the last step; a plateau decision made
    after that, at the end of the epoch, must reach the very next step.
    """
    for group, base, fn in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base * fn(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [g["lr"] for g in lr_scheduler.optimizer.param_groups]
