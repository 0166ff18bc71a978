"""Detector models built on Hugging Face CLIP, one per training strategy, built from `config.model`."""

from __future__ import annotations

from torch import nn

from ds_trainer.errors import ConfigError
from ds_trainer.models.clip import CLIPModel
from ds_trainer.models.loading import load_clip, load_vision_tower
from ds_trainer.models.prompt_tuning import PromptTuningWrapper

__all__ = ["CLIPModel", "PromptTuningWrapper", "build_model", "load_clip", "load_vision_tower"]


def build_model(section) -> nn.Module:  # section: config.ModelSection
    """fine-tune (optionally LoRA or frozen backbone) and zero-shot: a CLIPModel; prompt-tuning: wrapped zero-shot."""
    prompts = {"real_prompt": section.real_prompt, "ai_prompt": section.ai_prompt}
    if section.mode == "prompt-tuning":
        if section.gradient_checkpointing:
            raise ConfigError(
                "model.gradient_checkpointing: applies to mode fine-tune; prompt-tuning trains only the prompt "
                "context, whose activations (the text tower on two prompts) do not grow with the batch; set it to false"
            )
        base = CLIPModel(model_name=section.model_name, mode="zero-shot", num_classes=section.num_classes,
                         attn_implementation=section.attn_implementation, **prompts)  # fmt: skip
        return PromptTuningWrapper(base, prompt_length=section.prompt_length)
    return CLIPModel(
        model_name=section.model_name,
        mode=section.mode,
        freeze_backbone=section.freeze_backbone,
        num_classes=section.num_classes,
        lora=section.lora if section.lora.enabled else None,
        attn_implementation=section.attn_implementation,
        gradient_checkpointing=section.gradient_checkpointing,
        svd_residual=section.svd_residual if section.mode == "svd-residual" else None,
        **prompts,
    )
