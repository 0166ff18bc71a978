"""CLIP-based detector: the vision tower of a Hugging Face CLIP model plus a linear head.

`model_name` is a hub id (`openai/clip-vit-base-patch32`), a local directory in HF format (a
full CLIP checkpoint or a vision-only one), or `tiny`: a small randomly initialised tower for
demos and tests on machines that cannot download weights.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from ds_trainer.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("fine-tune",)

# Small enough to train in seconds on a CPU, same architecture as ViT-B/32.
TINY_VISION_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=224,
    patch_size=32,
    projection_dim=64,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _quiet_transformers() -> None:
    # transformers 5 prints a load report and progress bars on every from_pretrained, on every rank.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_vision_tower(model_name: str) -> nn.Module:
    """A `transformers.CLIPVisionModel` from a preset name, a local directory or a hub id."""
    _quiet_transformers()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if model_name == "tiny":
        return CLIPVisionModel(CLIPVisionConfig(**TINY_VISION_CONFIG))
    path = Path(model_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.model_name: {path} has no config.json; it is not a Hugging Face model directory")
        return _from_pretrained(CLIPVisionModel, str(path), model_name)
    if path.exists():
        raise ConfigError(f"model.model_name: {path} is a file; give a Hugging Face model directory or hub id")
    if not _HUB_ID.match(model_name):
        raise ConfigError(
            f"model.model_name: {model_name!r} is neither a directory nor a hub id (like "
            "openai/clip-vit-base-patch32), nor the preset 'tiny'"
        )
    return _from_pretrained(CLIPVisionModel, model_name, model_name)


def _from_pretrained(cls: type, source: str, name: str) -> nn.Module:
    try:
        return cls.from_pretrained(source)
    except OSError as exc:
        raise ConfigError(
            f"model.model_name: could not load {name!r}: {str(exc).splitlines()[0]}\n"
            "offline? download it once and point model_name at the local directory"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.model_name: {name!r} is not a CLIP model: {str(exc).splitlines()[0]}") from None


class CLIPModel(nn.Module):
    """CLIP vision tower → pooled [CLS] embedding → linear head with `num_classes` logits.

    Labels: 1 = ai (generated), 0 = nature (real).
    """

    def __init__(
        self,
        model_name: str = "openai/clip-vit-base-patch32",
        mode: str = "fine-tune",
        freeze_backbone: bool = False,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"model.mode: {mode!r} is not supported; choose one of {', '.join(MODES)}")
        self.model_name = model_name
        self.mode = mode
        self.backbone = load_vision_tower(model_name)
        hidden = self.backbone.config.hidden_size
        self.head = nn.Linear(hidden, num_classes)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return int(self.backbone.config.image_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone(pixel_values=pixel_values).pooler_output
        return self.head(pooled)

    def train(self, mode: bool = True) -> CLIPModel:
        super().train(mode)
        if self.freeze_backbone:
            # A frozen tower stays in eval mode so dropout (if configured) cannot perturb features.
            self.backbone.eval()
        return self
