"""The seed's Python API: `Trainer(model, tl, vl, learning_rate=..., optimizer_type=...)` keywords → a run config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ds_trainer.config import Config, TrainingSection, build_config
from ds_trainer.errors import ConfigError

# The seed's keyword names → the YAML `training:` keys they set.
_SEED_ALIASES = {"optimizer_type": "optimizer", "scheduler_type": "scheduler"}
_TRAINING_KEYS = set(TrainingSection.model_fields)


def config_from_keywords(config: Config | None, training: dict[str, Any], zero_stage: int | None, precision: str | None,
                         run_dir: str | Path | None) -> Config:  # fmt: skip
    """`config` (or an empty one) with the training keywords, the ZeRO stage, precision and run_dir applied."""
    tree: dict[str, Any] = config.to_dict() if config is not None else {}
    section = tree.setdefault("training", {})
    for key, value in training.items():
        name = _SEED_ALIASES.get(key, key)
        if name not in _TRAINING_KEYS:
            raise ConfigError(
                f"Trainer(): unknown keyword {key!r}; training keywords are "
                f"{', '.join(sorted(_TRAINING_KEYS | set(_SEED_ALIASES)))}"
            )
        section[name] = value.lower() if name in ("optimizer", "scheduler") and isinstance(value, str) else value
    if zero_stage is not None:
        tree.setdefault("deepspeed", {})["zero_stage"] = zero_stage
    if precision is not None:
        tree.setdefault("deepspeed", {})["precision"] = precision
    if run_dir is not None:
        tree.setdefault("logging", {})["run_dir"] = str(run_dir)
    elif config is None:  # seed-style use: outputs go next to the checkpoints
        tree.setdefault("logging", {})["run_dir"] = str(section.get("checkpoint_dir", "results/saved_models"))
    return build_config(tree, source="Trainer()")
