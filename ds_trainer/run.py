"""A training or evaluation run from a config: the short entry points over the components."""

from __future__ import annotations

import json
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


def _start(cfg: Config, debug: bool) -> Any:
    from ds_trainer.distributed import init_distributed, read_env
    from ds_trainer.sinks import configure_logging
    from ds_trainer.slurm import export_slurm_env

    # ZeRO's internals call a torch collective that torch 2.13 deprecates, once per step and rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    # A Slurm task first says on its own console where it sits in the job (every task: the job log
    # shows each node's), before other ranks' consoles go quiet.
    export_slurm_env()
    # Before the process group: what DeepSpeed logs while it starts, and a first launch's op
    # builds, reach train.log and rank 0's console already.
    configure_logging(read_env().rank, cfg.logging.run_dir, debug)
    env = init_distributed(cfg.distributed.timeout_s)
    seed_everything(cfg.seed)
    return env


def _check_image_size(cfg: Config, model: torch.nn.Module) -> None:
    if model.image_size != cfg.data.image_size:
        raise ConfigError(
            f"data.image_size is {cfg.data.image_size}, but {cfg.model.model_name} expects {model.image_size} px inputs"
        )


def _loaders(cfg: Config, env: Any, train: bool) -> tuple[Any, Any]:
    """(train loader or None, model-selection loader or None) for this rank.

    With `data.holdout_fraction`, model selection (val metrics, best, early stopping, plateau)
    runs on train shards held out from training: GenImage's `val` split is its test set, to be
    scored once with `ds-trainer eval`.
    """
    from ds_trainer.data import make_shard_loader
    from ds_trainer.data.transforms import Preprocess

    d = cfg.data
    common = dict(
        rank=env.rank, world_size=env.world_size, num_workers=d.num_workers, image_size=d.image_size, seed=cfg.seed,
        preprocess=Preprocess.from_config(d, draft=d.jpeg_draft), pin_memory=d.pin_memory,
    )  # fmt: skip
    eval_batch = d.eval_batch_size or cfg.training.batch_size
    train_loader = None
    if train:
        train_loader = make_shard_loader(
            d.shards, d.train_split, batch_size=cfg.training.batch_size, train=True, generators=d.train_generators,
            shuffle_buffer=d.shuffle_buffer, holdout_fraction=d.holdout_fraction, **common,
        )  # fmt: skip
    if train and d.holdout_fraction > 0:
        val_loader = make_shard_loader(
            d.shards, d.train_split, batch_size=eval_batch, train=False, generators=d.train_generators,
            holdout_fraction=d.holdout_fraction, holdout=True, **common,
        )  # fmt: skip
    elif d.val_split:
        val_loader = make_shard_loader(
            d.shards, d.val_split, batch_size=eval_batch, train=False, generators=d.eval_generators, **common
        )
    else:
        val_loader = None
    return train_loader, val_loader


def run_training(cfg: Config, load_dir: str | Path | None = None, debug: bool = False) -> list[dict[str, Any]]:
    from ds_trainer.models import build_model
    from ds_trainer.trainer import Trainer

    env = _start(cfg, debug)
    model = build_model(cfg.model)
    _check_image_size(cfg, model)
    eval_only = cfg.model.mode == "zero-shot"
    if eval_only and not cfg.data.val_split:
        raise ConfigError("model.mode zero-shot only evaluates: set data.val_split to the split to score")
    train_loader, val_loader = _loaders(cfg, env, train=not eval_only)
    trainer = Trainer(model, train_loader, val_loader, config=cfg)
    if eval_only:
        if load_dir is not None:
            raise ConfigError("--load-dir: a zero-shot model has no trained state to load")
        return [trainer.evaluate_and_log()]
    if load_dir is not None:
        trainer.resume_from_checkpoint(load_dir)
    return trainer.train()


def run_evaluation(
    cfg: Config,
    load_dir: str | Path,
    tag: str | None = None,
    out: str | Path | None = None,
    debug: bool = False,
    report_dir: str | Path | None = None,
    bootstrap: int = 1000,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """The benchmark protocol on a checkpoint: per generator acc, real/fake acc, AP, AUC and the
    metrics beyond accuracy (`detection_metrics`), their means over all generators and over those the
    checkpoint was not trained on, and (`bootstrap` resamples, 0 = none) their 95 % intervals.

    The model is rebuilt from the checkpoint's own config and its consolidated fp32 weights (any
    ZeRO stage, any world size the checkpoint was saved with); the data comes from `cfg`
    (`data.val_split`, `data.eval_generators`). Rank 0 prints the table and writes it as JSON, with
    every image's score (`predictions`), the checkpoint's config, and the date, commit and library
    versions (`provenance`) for `ds-trainer report`; with
    `report_dir` it writes that report too (and, with `logging.tensorboard`, PR curves and figures).
    """
    from ds_trainer.consolidate import rebuild_model, resolve_source
    from ds_trainer.metrics import format_protocol_table
    from ds_trainer.report import predictions_block
    from ds_trainer.sinks import console
    from ds_trainer.trainer import Trainer

    if not cfg.data.val_split:
        raise ConfigError("ds-trainer eval scores data.val_split; it is null in this config")
    env = _start(cfg, debug)
    source = resolve_source(load_dir, tag)
    model = rebuild_model(source)  # with the consolidated fp32 weights
    _check_image_size(cfg, model)
    _, val_loader = _loaders(cfg, env, train=False)
    trainer = Trainer(model, None, val_loader, config=cfg)
    trainer.trained_generators = trained = _trained_generators(source.config)
    metrics = trainer.evaluate()
    result = {
        "checkpoint": str(source.tag_dir), "epoch": source.meta.epoch, "global_step": source.meta.global_step,
        # where the scored images are: the report pulls its thumbnails of mistakes from there by key
        "shards": str(Path(cfg.data.shards).resolve()),
        "split": cfg.data.val_split, "samples": metrics["val_samples"], "bad_samples": metrics["val_bad_samples"],
        "generators": metrics.get("val_generators", {}),
        "overall": {k[len("val_"):]: metrics[k] for k in ("val_acc", "val_real_acc", "val_fake_acc", "val_ap", "val_auc", "val_loss")},
        "config": source.config, "trained_generators": trained,
    }  # fmt: skip
    if env.is_main:
        from ds_trainer.provenance import provenance

        result["provenance"] = provenance()
        pred = trainer.last_predictions or {}
        if result["generators"] and bootstrap:
            from ds_trainer.bootstrap import bootstrap_intervals, describe

            result["bootstrap"] = describe(bootstrap, bootstrap_seed)
            result["ci"] = bootstrap_intervals(pred["score"], pred["label"], pred["generator"], resamples=bootstrap,
                                               seed=bootstrap_seed, trained=trained)  # fmt: skip
        result["predictions"] = predictions_block(pred["score"], pred["label"], pred["generator"], pred.get("key"))
        path = Path(out) if out is not None else Path(cfg.logging.run_dir) / f"eval_{source.tag_dir.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_eval_json(_json_safe(result)))
        if result["generators"]:
            console().info("%s", format_protocol_table(result["generators"], result.get("ci")))
            if "ci" in result:
                console().info("[low, high]: 95 %% percentile bootstrap interval, %d resamples, seed %d", bootstrap,
                               bootstrap_seed)  # fmt: skip
        console().info("%d samples of split %s; written to %s", result["samples"], result["split"], path)
        if report_dir is not None:
            _write_report(cfg, path, report_dir)
    return result


def _trained_generators(config: dict[str, Any]) -> list[str] | None:
    """What a checkpoint's run trained on, from its saved config: `data.train_generators`, else every
    generator of its training split in its shard set (None when that set cannot be read here)."""
    from ds_trainer.data.manifest import load_manifest
    from ds_trainer.errors import DsTrainerError
    from ds_trainer.evaluation import trained_generators

    data, model = config.get("data") or {}, config.get("model") or {}
    mode, listed = model.get("mode", "fine-tune"), data.get("train_generators")
    if mode == "zero-shot" or listed is not None:
        return trained_generators(mode, listed, None)
    try:
        shards = load_manifest(data.get("shards", "data_shards/demo")).select(data.get("train_split", "train"))
    except DsTrainerError:
        return None
    return sorted({s.generator for s in shards})


def _write_report(cfg: Config, eval_path: Path, report_dir: str | Path) -> None:
    """The report of one eval result, with the training curves of its run when they are there."""
    from ds_trainer import report
    from ds_trainer.sinks import console

    run = report.load_eval(eval_path)
    run_dir = Path(cfg.logging.run_dir)
    if (run_dir / "metrics.jsonl").is_file():
        report.attach_run(run, run_dir)
    tensorboard = run_dir / "tensorboard" if cfg.logging.tensorboard else None
    written = report.write_report([run], report_dir, tensorboard=tensorboard)
    console().info("report: %s", written.html)


def _eval_json(result: dict[str, Any]) -> str:
    """Indented for reading, except the per-image predictions: one line, not one line per number."""
    head = {k: v for k, v in result.items() if k != "predictions"}
    text = json.dumps(head, indent=2)
    if "predictions" in result:
        text = text[:-2] + ',\n  "predictions": ' + json.dumps(result["predictions"]) + "\n}"
    return text + "\n"


def _json_safe(value: Any) -> Any:
    """NaN (e.g. the AUC of a one-class generator) is not JSON: write null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):  # a bootstrap interval [low, high]
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value
