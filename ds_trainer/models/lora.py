"""LoRA adapters (peft) inside the CLIP vision tower: train a few low-rank matrices, not the tower.

peft wraps the tower in a `PeftModel`, so adapter and base weights are named
`backbone.base_model.model.<tower path>...` (`...q_proj.lora_A.default.weight` for an adapter) and
stay under `backbone`, where the Trainer's backbone learning rate applies. peft freezes every base
weight; the detector's head, outside the wrapper, keeps training.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from torch import nn

from ds_trainer.config import LoraSection
from ds_trainer.errors import ConfigError

# The layer types peft's LoRA can adapt; a target naming anything else is a typo.
_ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Embedding)


def lora_section(lora: LoraSection | Mapping[str, Any] | None) -> LoraSection | None:
    """The LoRA settings to apply, or None. A plain dict means "enabled" unless it says otherwise."""
    if lora is None:
        return None
    if not isinstance(lora, LoraSection):
        try:
            lora = LoraSection.model_validate({"enabled": True, **lora})
        except ValidationError as exc:
            raise ConfigError("; ".join(_describe(err) for err in exc.errors())) from None
    return lora if lora.enabled else None


def _describe(err: Mapping[str, Any]) -> str:
    key = "model.lora." + ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {key}; valid keys: {', '.join(LoraSection.model_fields)}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def adaptable_module_names(tower: nn.Module) -> list[str]:
    """Short names (`q_proj`, `fc1`, ...) of the layers LoRA can target, for error messages."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in tower.named_modules() if isinstance(module, _ADAPTABLE)})


def apply_lora(tower: nn.Module, lora: LoraSection) -> nn.Module:
    """The tower wrapped by peft with LoRA on `lora.target_modules`; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    names = [name for name, module in tower.named_modules() if isinstance(module, _ADAPTABLE)]
    unknown = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise ConfigError(
            f"model.lora.target_modules: {', '.join(unknown)} not found in the vision tower; "
            f"valid module names: {', '.join(adaptable_module_names(tower))}"
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft probes a deprecated transformers attribute; the warning is theirs, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(tower, config)
