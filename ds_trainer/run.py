"""One training run from a config: the ~40-line entry point over the components."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_trainer.config import Config
from ds_trainer.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(cfg: Config, load_dir: str | Path | None = None, debug: bool = False) -> list[dict[str, Any]]:
    from ds_trainer.data import make_shard_loader
    from ds_trainer.distributed import init_distributed
    from ds_trainer.models import build_model
    from ds_trainer.sinks import configure_logging
    from ds_trainer.trainer import Trainer

    # ZeRO's internals call a torch collective that torch 2.13 deprecates, once per step and rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    env = init_distributed()
    configure_logging(env.rank, cfg.logging.run_dir, debug)
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    if model.image_size != cfg.data.image_size:
        raise ConfigError(
            f"data.image_size is {cfg.data.image_size}, but {cfg.model.model_name} expects {model.image_size} px inputs"
        )
    d = cfg.data
    eval_only = cfg.model.mode == "zero-shot"
    if eval_only and not d.val_split:
        raise ConfigError("model.mode zero-shot only evaluates: set data.val_split to the split to score")
    common = dict(rank=env.rank, world_size=env.world_size, num_workers=d.num_workers, image_size=d.image_size, seed=cfg.seed)
    train_loader = None
    if not eval_only:
        train_loader = make_shard_loader(
            d.shards, d.train_split, batch_size=cfg.training.batch_size, train=True,
            generators=d.train_generators, shuffle_buffer=d.shuffle_buffer, **common,
        )  # fmt: skip
    val_loader = None
    if d.val_split:
        val_loader = make_shard_loader(
            d.shards, d.val_split, batch_size=d.eval_batch_size or cfg.training.batch_size, train=False,
            generators=d.eval_generators, **common,
        )  # fmt: skip
    trainer = Trainer(model, train_loader, val_loader, config=cfg)
    if eval_only:
        if load_dir is not None:
            raise ConfigError("--load-dir: a zero-shot model has no trained state to load")
        return [trainer.evaluate_and_log()]
    if load_dir is not None:
        trainer.resume_from_checkpoint(load_dir)
    return trainer.train()
