"""CLIP-based detector in two modes: a fine-tuned vision tower with a linear head, or zero-shot prompts.

`model_name` is a hub id (`openai/clip-vit-base-patch32`), a local directory in HF format (a
full CLIP checkpoint, or a vision-only one for fine-tune), or `tiny`: a small randomly initialised
CLIP (and an offline tokenizer) for demos and tests on machines that cannot download weights.

What trains, per strategy (the Trainer optimises exactly the parameters with requires_grad):

| strategy                                   | trainable                          |
|--------------------------------------------|------------------------------------|
| fine-tune                                  | everything (`backbone.*`, `head.*`)|
| fine-tune, `freeze_backbone=True` (probe)  | `head.*`                           |
| fine-tune, `lora=...`                      | LoRA `lora_A`/`lora_B` + `head.*`  |
| svd-residual (Effort, `svd_residual.py`)   | `...svd.U_r/S_r/Vh_r` + `head.*`   |
| zero-shot                                  | nothing (evaluation only)          |
| prompt-tuning (`PromptTuningWrapper`)      | `prompt_ctx` only                  |

Naming contract: every CLIP weight (towers, projections, LoRA adapters) has `backbone` as a
component of its parameter name, the head is `head.*`, so the Trainer can give the backbone its own
learning rate without knowing the strategy. In the text modes CLIP's `logit_scale` is a buffer
(still `backbone.logit_scale` in the state dict), see `_logit_scale_as_buffer`.

Speed switches: `attn_implementation` ("sdpa" or "eager") picks transformers' attention kernel in
every tower; `gradient_checkpointing` recomputes each vision encoder layer's forward in backward
instead of keeping its activations (fine-tune only, where the tower trains: full or LoRA).
benchmarks/speed_switches.py measures both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_trainer.config import LoraSection, SvdResidualSection
from ds_trainer.errors import ConfigError
from ds_trainer.models.loading import TINY_TEXT_CONFIG, TINY_VISION_CONFIG, load_clip, load_vision_tower
from ds_trainer.models.lora import apply_lora, lora_section
from ds_trainer.models.svd_residual import apply_svd_residual
from ds_trainer.models.svd_residual import auxiliary_loss as svd_auxiliary_loss

__all__ = ["MODES", "TINY_TEXT_CONFIG", "TINY_VISION_CONFIG", "CLIPModel", "load_vision_tower"]

# prompt-tuning is built as PromptTuningWrapper(CLIPModel(mode="zero-shot")), see build_model.
MODES = ("fine-tune", "zero-shot", "svd-residual")
TOWER_MODES = ("fine-tune", "svd-residual")  # vision tower + linear head


class CLIPModel(nn.Module):
    """A binary real/AI detector on CLIP. Labels: 1 = ai (generated), 0 = nature (real).

    fine-tune: `backbone` is the vision tower (`transformers.CLIPVisionModel`, or peft's wrapper of
    it with `lora`), its pooled [CLS] embedding feeds `head`, a linear layer with `num_classes`
    logits. All of it trains unless `freeze_backbone` (head only) or `lora` (adapters + head).

    zero-shot: `backbone` is the whole `transformers.CLIPModel`; logits are CLIP's image-text
    similarities to `real_prompt` (column 0) and `ai_prompt` (column 1), so softmax column 1 is
    the AI score. Nothing trains. The prompts' text embeddings are cached and recomputed when a
    prompt changes, the weights are (re)loaded, or the module switches train/eval mode.
    """

    def __init__(
        self,
        model_name: str = "openai/clip-vit-base-patch32",
        mode: str = "fine-tune",
        freeze_backbone: bool = False,
        num_classes: int = 2,
        real_prompt: str = "a real photo",
        ai_prompt: str = "an AI-generated image",
        lora: LoraSection | Mapping[str, Any] | None = None,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        svd_residual: SvdResidualSection | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            hint = "; build prompt-tuning with PromptTuningWrapper(CLIPModel(mode='zero-shot'))"
            raise ConfigError(
                f"model.mode: {mode!r} is not supported by CLIPModel; choose one of {', '.join(MODES)}"
                + (hint if mode == "prompt-tuning" else "")
            )
        lora_settings = lora_section(lora)
        self.model_name = model_name
        self.mode = mode
        self.freeze_backbone = freeze_backbone
        self.real_prompt = real_prompt
        self.ai_prompt = ai_prompt
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.tokenizer: Any = None
        self.svd_settings = _svd_section(svd_residual)
        self.svd_modules: list[nn.Module] = []
        if mode in TOWER_MODES:
            self._build_fine_tune(num_classes, lora_settings)
        else:
            self._build_zero_shot(num_classes, lora_settings)

    # ------------------------------------------------------------------ building
    def _build_fine_tune(self, num_classes: int, lora: LoraSection | None) -> None:
        if lora is not None and self.freeze_backbone:
            raise ConfigError("model.lora: LoRA trains adapters inside the backbone; set freeze_backbone to false")
        if self.gradient_checkpointing and self.freeze_backbone:
            raise ConfigError(
                "model.gradient_checkpointing: with freeze_backbone only the head trains, so the tower keeps no "
                "activations for backward and there is nothing to recompute; set it to false"
            )
        tower = load_vision_tower(self.model_name, attn_implementation=self.attn_implementation)
        self.vision_config = tower.config
        self.backbone = apply_lora(tower, lora) if lora is not None else tower
        if self.mode == "svd-residual":
            if lora is not None or self.freeze_backbone:
                raise ConfigError("model.mode: svd-residual trains its own residuals; disable lora and freeze_backbone")
            # Before any engine exists: the SVD needs the full weights, ZeRO-3 would have partitioned them.
            svd = self.svd_settings
            modules = apply_svd_residual(tower, svd.r, list(svd.projections))
            self.svd_modules = modules  # a plain list: the modules stay registered under backbone only
        self.head = nn.Linear(tower.config.hidden_size, num_classes)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        if self.gradient_checkpointing:
            # After peft wrapped the tower (its wrapper would otherwise hook the patch embedding to
            # require grad, needed by reentrant checkpointing only). The non-reentrant variant
            # gives LoRA adapters their gradients although the layer inputs do not require grad.
            # transformers checkpoints each encoder layer's forward while the layer is in training mode.
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def _build_zero_shot(self, num_classes: int, lora: LoraSection | None) -> None:
        if num_classes != 2:
            raise ConfigError(f"model.num_classes: mode {self.mode} scores two prompts (real, ai); set it to 2")
        if lora is not None:
            raise ConfigError(f"model.lora: LoRA applies to mode fine-tune, not {self.mode}; disable it")
        if self.freeze_backbone:
            raise ConfigError(f"model.freeze_backbone: mode {self.mode} never trains the backbone; leave it false")
        if self.gradient_checkpointing:
            # Zero-shot trains nothing; prompt-tuning (built on this mode) trains only its context,
            # whose activations are the text tower's on two prompts: no batch-sized memory to save.
            raise ConfigError(
                f"model.gradient_checkpointing: applies to mode fine-tune (the vision tower trains); mode {self.mode} "
                "keeps no batch-sized activations for backward; set it to false"
            )
        self.backbone, self.tokenizer = load_clip(self.model_name, attn_implementation=self.attn_implementation)
        self.vision_config = self.backbone.config.vision_config
        self.backbone.requires_grad_(False)
        _logit_scale_as_buffer(self.backbone)
        # Derived from weights and prompts, so not saved with the weights.
        self.register_buffer("prompt_embeds", None, persistent=False)
        self._prompt_embeds_for: tuple[str, str] | None = None
        self._token_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.register_load_state_dict_post_hook(_drop_prompt_cache)

    # ------------------------------------------------------------------ shared
    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def prompts(self) -> tuple[str, str]:
        """(class 0 = real, class 1 = ai) texts."""
        return self.real_prompt, self.ai_prompt

    def auxiliary_loss(self) -> torch.Tensor | None:
        """svd-residual in training: the weighted constraint losses of the last forward (None otherwise)."""
        if not self.svd_modules:
            return None
        s = self.svd_settings
        return svd_auxiliary_loss(self.svd_modules, s.orthogonal_weight, s.singular_value_weight)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.mode in TOWER_MODES:
            return self.head(self.backbone(pixel_values=pixel_values).pooler_output)
        return self.similarity_logits(self.encode_images(pixel_values), self.encode_prompts())

    def train(self, mode: bool = True) -> CLIPModel:
        super().train(mode)
        if self.freeze_backbone or self.mode == "zero-shot":
            # A frozen tower stays in eval mode so dropout (if configured) cannot perturb features.
            self.backbone.eval()
        if self.mode == "zero-shot":
            self._drop_prompt_cache()
        return self

    # ------------------------------------------------------------------ zero-shot pieces
    # PromptTuningWrapper reuses these; only the text side differs.
    def tokenize_prompts(self, reserve: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [2, L] of (real, ai) prompts and each one's EOS position [2], on the backbone's device.

        `reserve` tokens are kept free for prompt-tuning context; a prompt too long for CLIP's
        context is an error rather than a silent truncation that would drop its EOS token.
        """
        device = self.backbone.logit_scale.device
        key = (self.prompts, reserve, device)
        if key not in self._token_cache:
            self._token_cache = {key: self._tokenize(reserve, device)}
        return self._token_cache[key]

    def _tokenize(self, reserve: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        text_config = self.backbone.config.text_config
        ids = tok(list(self.prompts), padding=True, return_tensors="pt").input_ids
        context = text_config.max_position_embeddings
        if ids.shape[1] + reserve > context:
            which = "model.real_prompt/model.ai_prompt" + (" or model.prompt_length" if reserve else "")
            raise ConfigError(
                f"{which}: {ids.shape[1]} prompt tokens + {reserve} context tokens exceed CLIP's text context of "
                f"{context}; shorten the prompts" + (" or lower prompt_length" if reserve else "")
            )
        if int(ids.max()) >= text_config.vocab_size:
            raise ConfigError(
                f"model.model_name: the tokenizer produces id {int(ids.max())} but the text tower has "
                f"{text_config.vocab_size} tokens; the tokenizer files do not belong to this model"
            )
        is_eos = ids == tok.eos_token_id
        if not bool(is_eos.any(dim=1).all()):
            raise ConfigError("model.model_name: the tokenizer adds no end-of-text token; it is not a CLIP tokenizer")
        # The first EOS: with CLIP's tokenizer the padding is EOS too.
        return ids.to(device), is_eos.int().argmax(dim=1).to(device)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings [B, projection_dim]."""
        features = self.backbone.get_image_features(pixel_values=pixel_values).pooler_output
        return F.normalize(features, dim=-1)

    def encode_prompts(self) -> torch.Tensor:
        """L2-normalised projected text embeddings of (real, ai) [2, projection_dim], cached."""
        if self.prompt_embeds is None or self._prompt_embeds_for != self.prompts:
            ids, _ = self.tokenize_prompts()
            with torch.no_grad():
                features = self.backbone.get_text_features(input_ids=ids).pooler_output
            self.prompt_embeds = F.normalize(features, dim=-1)
            self._prompt_embeds_for = self.prompts
        return self.prompt_embeds

    def similarity_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP's logits: `logit_scale.exp()` times the cosine similarity, [B, 2]."""
        scale = self.backbone.logit_scale.exp()
        return scale * image_embeds @ text_embeds.to(image_embeds.dtype).t()

    def _drop_prompt_cache(self) -> None:
        self.prompt_embeds = None
        self._prompt_embeds_for = None


def _svd_section(section: SvdResidualSection | Mapping[str, Any] | None) -> SvdResidualSection:
    if section is None or isinstance(section, SvdResidualSection):
        return section or SvdResidualSection()
    from pydantic import ValidationError

    try:
        return SvdResidualSection.model_validate(dict(section))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "model.svd_residual." + ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{key}: {err['msg']} (got {err.get('input')!r})") from None


def _logit_scale_as_buffer(clip: nn.Module) -> None:
    """Turn CLIP's 0-dim `logit_scale` parameter into a buffer of the same name (and state-dict key).

    It never trains in the text modes, and DeepSpeed (0.19.8) cannot start with a 0-dim parameter:
    `_broadcast_model` views every parameter, frozen ones included, as bytes, which fails for a
    scalar. A buffer is not broadcast, keeps `backbone.logit_scale` in checkpoints and in
    `save_pretrained`, and is never partitioned by ZeRO-3.
    """
    scale = clip.logit_scale.detach().clone()
    del clip.logit_scale
    clip.register_buffer("logit_scale", scale)


def _drop_prompt_cache(module: nn.Module, incompatible_keys: Any) -> None:
    # New weights (a checkpoint, load_state_dict) make cached text embeddings stale.
    module._drop_prompt_cache()
