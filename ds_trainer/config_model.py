"""The config's building blocks and its `model` section (strategies, LoRA, svd-residual); config.py has the rest.

Split from config.py to keep both short; import everything from `ds_trainer.config`, which re-exports these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bounds shared by several keys: far beyond any real run, well inside what the consumers accept.
MAX_COUNT = 100_000  # epochs, patience, save/step intervals, kept checkpoints
MAX_BATCH = 65_536  # per-rank samples of one step (DeepSpeed's train_batch_size is an int32 product)
MAX_PATH = 4096  # PATH_MAX: every string key that is not bounded more tightly
MAX_ITEMS = 1000  # list keys (generators, target modules)
Tag = Annotated[str, Field(max_length=64)]  # W&B refuses longer tags


class Section(BaseModel):
    """A config section: unknown keys are errors, and it unpacks like a mapping.

    The mapping protocol is what lets the seed's `Trainer(..., **config.training)` work.
    """

    # No NaN/Inf anywhere (`.inf` would pass a `gt=0` bound and print as `Infinity`, not JSON).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, str_max_length=MAX_PATH)

    def keys(self) -> list[str]:
        return list(type(self).model_fields)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.keys())


class LoraSection(Section):
    """LoRA adapters (via peft) on the vision tower's attention projections."""

    enabled: bool = False
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0, le=4096)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=64)


class SvdResidualSection(Section):
    """mode svd-residual (Effort, ICML 2025): train the last r singular components of attention projections."""

    r: int = Field(1, ge=1, le=4096, description="trainable singular components per projection (< min(W's dims))")
    projections: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1, max_length=4
    )
    orthogonal_weight: float = Field(
        1.0, ge=0, le=1e6, description="weight of 0.5||U^T U - I||_F + 0.5||V V^T - I||_F (mean over projections)"
    )
    singular_value_weight: float = Field(
        1.0, ge=0, le=1e6, description="weight of | ||W'||_F^2 - ||W||_F^2 | (mean over projections)"
    )


class ModelSection(Section):
    model_name: str = Field("tiny", description="hub id, local HF directory, or 'tiny' (random init)")
    mode: Literal["fine-tune", "zero-shot", "prompt-tuning", "svd-residual"] = Field(
        "fine-tune",
        description="fine-tune: vision tower + linear head; zero-shot: CLIP text prompts, eval only; "
        "prompt-tuning: zero-shot with learnable prompt context (CoOp); svd-residual: fine-tune of the "
        "attention weights' last singular components only (Effort)",
    )
    freeze_backbone: bool = Field(False, description="fine-tune only: train the head alone (linear probe)")
    num_classes: int = Field(2, ge=2, le=MAX_COUNT)
    # CLIP's tokenizer keeps 77 tokens; 1000 characters is well past that.
    real_prompt: str = Field(
        "a real photo", max_length=1000, description="zero-shot/prompt-tuning text for class 0 (nature)"
    )
    ai_prompt: str = Field(
        "an AI-generated image", max_length=1000, description="zero-shot/prompt-tuning text for class 1 (ai)"
    )
    prompt_length: int = Field(10, ge=1, le=64, description="prompt-tuning: learnable context tokens")
    lora: LoraSection = Field(default_factory=LoraSection)
    svd_residual: SvdResidualSection = Field(default_factory=SvdResidualSection)
    # --- speed switches (benchmarks/RESULTS.md measures each)
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel: sdpa (torch scaled_dot_product_attention, fused on GPU) or eager"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the vision tower's activations in backward: less memory, ~30% more compute"
    )
    compile: bool = Field(False, description="torch.compile the model (the first steps pay the compilation)")

    @model_validator(mode="after")
    def _check_strategy(self) -> ModelSection:
        if self.mode == "svd-residual":
            self._check_svd_residual()
        elif self.svd_residual != SvdResidualSection():  # saved configs list the defaults: those are fine
            raise ValueError(f"svd_residual applies to mode svd-residual, not {self.mode}; remove the section")
        if self.lora.enabled and self.mode != "fine-tune":
            raise ValueError(f"lora applies to mode fine-tune, not {self.mode}")
        if self.lora.enabled and self.freeze_backbone:
            raise ValueError("lora.enabled and freeze_backbone contradict: LoRA trains adapters inside the backbone")
        if self.freeze_backbone and self.mode != "fine-tune":
            raise ValueError(f"freeze_backbone applies to mode fine-tune; mode {self.mode} never trains the backbone")
        if self.gradient_checkpointing and (self.mode != "fine-tune" or self.freeze_backbone):
            why = (
                "freeze_backbone trains the head alone"
                if self.mode == "fine-tune"
                else f"mode {self.mode} trains no tower"
            )
            raise ValueError(
                f"gradient_checkpointing saves activation memory of a trained backbone; {why}, so set it false"
            )
        if self.mode not in ("fine-tune", "svd-residual") and self.num_classes != 2:
            raise ValueError(f"mode {self.mode} scores two prompts (real, ai); num_classes must be 2")
        return self

    def _check_svd_residual(self) -> None:
        if self.freeze_backbone:
            raise ValueError(
                "mode svd-residual and freeze_backbone contradict: it trains residuals inside the backbone"
            )
        if self.lora.enabled:
            raise ValueError("mode svd-residual and lora.enabled contradict: choose one way to adapt the tower")
        if self.gradient_checkpointing:
            raise ValueError(
                "gradient_checkpointing is not supported with mode svd-residual: the recomputed forward would "
                "compute the constraint losses again in backward; set it false"
            )
