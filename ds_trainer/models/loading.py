"""Loading CLIP from a preset name, a local Hugging Face directory or a hub id, with errors a user can act on.

Two shapes are loaded: the vision tower alone (`fine-tune`: the text half would be dead weight) and
the full model with its tokenizer (`zero-shot`, `prompt-tuning`: they score text prompts). Both
accept the same `model_name`s. transformers is lenient where we must not be: a vision-only
checkpoint "loads" as a full CLIP with a random text tower, and a missing tokenizer "loads" as an
empty vocabulary, both with at most a log line. Those cases are errors here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from ds_trainer.errors import ConfigError

# Small enough to train in seconds on a CPU, same architecture as ViT-B/32.
TINY_VISION_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 32,
    "projection_dim": 64,
}
# The matching text tower; vocab size and special token ids come from the tiny tokenizer.
TINY_TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 64,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# transformers' attention kernels we offer (config.model.attn_implementation): "sdpa" is
# torch.nn.functional.scaled_dot_product_attention (fused kernels on GPU), "eager" is CLIP's own
# matmul-softmax-matmul. Both compute the same function.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def _quiet_transformers() -> None:
    # transformers 5 prints a load report and progress bars on every from_pretrained, on every rank.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _resolve(model_name: str) -> tuple[str, Path | None]:
    """(source for from_pretrained, local directory or None for a hub id); checks the name's shape."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.model_name: {path} has no config.json; it is not a Hugging Face model directory")
        return str(path), path
    if path.exists():
        raise ConfigError(f"model.model_name: {path} is a file; give a Hugging Face model directory or hub id")
    if not _HUB_ID.match(model_name):
        raise ConfigError(
            f"model.model_name: {model_name!r} is neither a directory nor a hub id (like "
            "openai/clip-vit-base-patch32), nor the preset 'tiny'"
        )
    return model_name, None


def load_vision_tower(model_name: str, attn_implementation: str = "sdpa") -> nn.Module:
    """A `transformers.CLIPVisionModel` from a preset name, a local directory or a hub id.

    A full CLIP checkpoint works too: transformers picks its vision half. `attn_implementation`
    ("sdpa" or "eager") is the attention kernel every layer uses.
    """
    _check_attn_implementation(attn_implementation)
    _quiet_transformers()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if model_name == "tiny":
        # A config's `attn_implementation` keyword is what `from_pretrained(..., attn_implementation=)`
        # sets too; the model checks it is supported when it is built.
        tower = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION_CONFIG, attn_implementation=attn_implementation))
    else:
        source, _ = _resolve(model_name)
        tower = _from_pretrained(CLIPVisionModel, source, model_name, attn_implementation=attn_implementation)
    return _checked_attn(tower, attn_implementation, model_name)


def load_clip(model_name: str, attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """(`transformers.CLIPModel` with both towers, its `CLIPTokenizer`) for the text-using modes.

    `attn_implementation` applies to both towers.
    """
    _check_attn_implementation(attn_implementation)
    _quiet_transformers()
    from transformers import CLIPConfig, CLIPTokenizer
    from transformers import CLIPModel as HFCLIPModel

    if model_name == "tiny":
        from ds_trainer.models.tiny_tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        text = {
            **TINY_TEXT_CONFIG,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        config = CLIPConfig(text_config=text, vision_config=TINY_VISION_CONFIG, projection_dim=64,
                            attn_implementation=attn_implementation)  # fmt: skip
        return _checked_attn(HFCLIPModel(config), attn_implementation, model_name), tokenizer

    source, local = _resolve(model_name)
    if local is not None:
        _check_full_clip_directory(local)
    model, info = _from_pretrained(HFCLIPModel, source, model_name, output_loading_info=True,
                                   attn_implementation=attn_implementation)  # fmt: skip
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(("text_model.", "text_projection"))]
    if missing:
        raise ConfigError(
            f"model.model_name: {model_name!r} has no text tower ({len(missing)} text weights missing, e.g. "
            f"{missing[0]}); zero-shot and prompt-tuning need a full CLIP checkpoint, or use mode fine-tune"
        )
    tokenizer = _load_tokenizer(CLIPTokenizer, source, model_name)
    return _checked_attn(model, attn_implementation, model_name), tokenizer


def _check_attn_implementation(attn_implementation: str) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation: {attn_implementation!r} is not supported; choose one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}"
        )


def _checked_attn(model: nn.Module, attn_implementation: str, name: str) -> nn.Module:
    """The model, once every (sub-)config says it runs `attn_implementation` (transformers may fall back silently)."""
    configs = [model.config, *(getattr(model.config, key) for key in model.config.sub_configs)]
    used = {c._attn_implementation for c in configs if c is not None}
    if used != {attn_implementation}:
        raise ConfigError(
            f"model.attn_implementation: asked for {attn_implementation!r}, but transformers set up {name!r} "
            f"with {', '.join(sorted(map(str, used)))}; choose another of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    return model


def _check_full_clip_directory(path: Path) -> None:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.model_name: {path}/config.json is unreadable: {exc}") from None
    if model_type != "clip":
        raise ConfigError(
            f"model.model_name: {path} holds a {model_type!r} model; zero-shot and prompt-tuning need a full CLIP "
            "(model_type 'clip', vision and text towers), or use mode fine-tune for a vision-only checkpoint"
        )
    has_tokenizer = (path / "tokenizer.json").is_file() or all(
        (path / f).is_file() for f in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        raise ConfigError(
            f"model.model_name: {path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
            "zero-shot and prompt-tuning tokenize the prompts: save CLIP's tokenizer there with "
            "tokenizer.save_pretrained(path)"
        )


def _load_tokenizer(cls: type, source: str, name: str) -> Any:
    try:
        tokenizer = cls.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.model_name: could not load the tokenizer of {name!r}: {_first_line(exc)}") from None
    # Without files (say, a hub id whose tokenizer is not cached offline) transformers builds an
    # empty three-token vocabulary instead of failing; a byte-level BPE has at least 256 symbols.
    if len(tokenizer) < 256:
        raise ConfigError(
            f"model.model_name: no tokenizer files found for {name!r} (got a {len(tokenizer)}-token vocabulary); "
            "offline? download the model with its tokenizer once and point model_name at the local directory"
        )
    return tokenizer


def _from_pretrained(cls: type, source: str, name: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"model.model_name: could not load {name!r}: {_first_line(exc)}\n"
            "offline? download it once and point model_name at the local directory"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.model_name: {name!r} is not a CLIP model: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
