"""A training or evaluation run from a config: the short entry points over the components."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ds_trainer.config import Config
from ds_trainer.errors import ConfigError
from ds_trainer.run_lock import RunLocks

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ds_trainer.eval_datasets import DatasetSpec
    from ds_trainer.eval_tracks import EvalTracks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _start(cfg: Config, debug: bool, locks: RunLocks | None = None) -> Any:
    """The process group and logging; with `locks`, those are held (collective) before train.log is written.

    The locks come right after the process group, before the minutes of set-up (the model, the
    loaders, the engine) and before anything in the run's directories is written: a run refused
    because another one holds them (or because they cannot be written) leaves them as they were.
    """
    from ds_trainer.distributed import init_distributed, read_env
    from ds_trainer.sinks import configure_logging
    from ds_trainer.slurm import export_slurm_env

    # ZeRO's internals call a torch collective that torch 2.13 deprecates, once per step and rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    # A Slurm task first says on its own console where it sits in the job (every task: the job log
    # shows each node's), before other ranks' consoles go quiet.
    export_slurm_env()
    # Before the process group: what DeepSpeed logs while it starts, and a first launch's op
    # builds, reach rank 0's console already, and train.log once the run's directories are locked.
    rank = read_env().rank
    configure_logging(rank, cfg.logging.run_dir, debug, hold_file=locks is not None)
    env = init_distributed(cfg.distributed.timeout_s)
    if locks is not None:
        locks.acquire(env.is_main, env.world_size)
        configure_logging(rank, cfg.logging.run_dir)  # train.log, with the lines held until now
    seed_everything(cfg.seed)
    return env


def _check_image_size(cfg: Config, model: torch.nn.Module) -> None:
    if model.image_size != cfg.data.image_size:
        raise ConfigError(
            f"data.image_size is {cfg.data.image_size}, but {cfg.model.model_name} expects {model.image_size} px inputs"
        )


def build_loaders(cfg: Config, env: Any, train: bool, preprocess: Any = None) -> tuple[Any, Any]:
    """(train loader or None, model-selection loader or None) for this rank.

    With `data.holdout_fraction`, model selection (val metrics, best, early stopping, plateau)
    runs on train shards held out from training: GenImage's `val` split is its test set, to be
    scored once with `ds-trainer eval`. `preprocess` replaces the one the config describes (eval's
    perturbed and debiased passes).
    """
    from ds_trainer.data import make_shard_loader
    from ds_trainer.data.transforms import Preprocess

    d = cfg.data
    common = dict(
        rank=env.rank, world_size=env.world_size, num_workers=d.num_workers, image_size=d.image_size, seed=cfg.seed,
        preprocess=preprocess or Preprocess.from_config(d, draft=d.jpeg_draft, uint8=True), pin_memory=d.pin_memory,
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

    eval_only = cfg.model.mode == "zero-shot"
    # Held from before the set-up to the end; a zero-shot run writes no checkpoints, only its run_dir.
    with RunLocks.for_run(cfg, checkpoints=not eval_only) as locks:
        env = _start(cfg, debug, locks)
        model = build_model(cfg.model)
        _check_image_size(cfg, model)
        if eval_only and not cfg.data.val_split:
            raise ConfigError("model.mode zero-shot only evaluates: set data.val_split to the split to score")
        train_loader, val_loader = build_loaders(cfg, env, train=not eval_only)
        trainer = Trainer(model, train_loader, val_loader, config=cfg, locks=locks)
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
    tracks: EvalTracks | None = None,
    datasets: Sequence[DatasetSpec] | None = None,
    bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    thresholds: Sequence[str | float] = (),
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
    `tracks` (an `eval_tracks.EvalTracks`) adds the robustness and debiased tables beside the clean one.
    `datasets` (`eval_datasets.DatasetSpec`s) scores those shard sets instead of `data.shards`, each
    whole on its own split, and adds the cross-dataset table (the JSON's `datasets` block).
    `thresholds` (`eval_thresholds` modes; `data.threshold` when not 0.5 is added) adds a table per
    mode beside the main one at 0.5 (the JSON's `thresholds` block).
    """
    from ds_trainer.consolidate import rebuild_model, resolve_source
    from ds_trainer.metrics import format_protocol_table
    from ds_trainer.report import predictions_block
    from ds_trainer.sinks import console
    from ds_trainer.trainer import Trainer

    if not cfg.data.val_split and not datasets:
        raise ConfigError("ds-trainer eval scores data.val_split; it is null in this config")
    if len(datasets or ()) > 1 and tracks is not None and tracks.any:
        raise ConfigError("--perturb, --align-jpeg and --size-matched score one shard set; give a single --shards")
    if tracks is not None and (tracks.perturbations or tracks.align_jpeg is not None) and cfg.data.decode == "gpu":
        # before the clean pass: these degrade the decoded image in the loader workers (device_decode.for_loader)
        raise ConfigError(
            "--perturb and --align-jpeg act on the decoded image in the loader workers, which data.decode gpu does "
            "not decode in: score these tracks with --set data.decode=cpu"
        )
    if tracks is not None and tracks.any:
        from ds_trainer.data.manifest import load_manifest
        from ds_trainer.data.prepared import check_tracks

        # before the clean pass: a prepared set cannot give some tracks as its source would
        check_tracks(load_manifest(datasets[0].path if datasets else cfg.data.shards), tracks)
    env = _start(cfg, debug)
    source = resolve_source(load_dir, tag)
    modes, calibration = _threshold_modes(cfg, source, thresholds)
    model = rebuild_model(source)  # with the consolidated fp32 weights
    _check_image_size(cfg, model)
    sets: dict[str, Any] = {}
    if datasets:
        from ds_trainer.eval_datasets import score_datasets

        cfg = _for_dataset(cfg, datasets[0])
    _, val_loader = build_loaders(cfg, env, train=False)
    trainer = Trainer(model, None, val_loader, config=cfg)
    trainer.trained_generators = trained = _trained_generators(source.config)
    if len(datasets or ()) > 1:
        rows, preds = score_datasets(datasets, trainer.evaluate, lambda: trainer.last_predictions or {},
                                     lambda spec: build_loaders(_for_dataset(cfg, spec), env, train=False)[1])  # fmt: skip
        metrics, clean, sets = _pooled(rows, preds)
    else:
        metrics = trainer.evaluate()
        clean = trainer.last_predictions or {}
        if datasets:
            sets = {datasets[0].name: (datasets[0], metrics)}
    extra: dict[str, Any] = {}
    if tracks is not None:
        from ds_trainer.data.transforms import Preprocess
        from ds_trainer.eval_tracks import run_tracks

        base = Preprocess.from_config(cfg.data, uint8=True)  # normalised on the device, as in build_loaders
        extra = run_tracks(trainer.evaluate, lambda p: build_loaders(cfg, env, False, p)[1], base, tracks, clean)
    result = {
        "checkpoint": str(source.tag_dir), "epoch": source.meta.epoch, "global_step": source.meta.global_step,
        # where the scored images are: the report pulls its thumbnails of mistakes from there by key
        "shards": str(Path(cfg.data.shards).resolve()),
        "split": cfg.data.val_split, "samples": metrics["val_samples"], "bad_samples": metrics["val_bad_samples"],
        # how each image was cropped: the checkpoint's config below is the training run's, not this eval's
        "crop": cfg.data.crop, "eval_crops": cfg.data.eval_crops,
        "generators": metrics.get("val_generators", {}),
        "overall": {k[len("val_"):]: metrics[k] for k in ("val_acc", "val_real_acc", "val_fake_acc", "val_ap", "val_auc", "val_loss")},
        **extra, "config": source.config, "trained_generators": trained,
        "calibration": calibration.to_dict() if calibration is not None else None,
    }  # fmt: skip
    if modes:
        from ds_trainer.eval_thresholds import threshold_tables

        result["thresholds"] = threshold_tables(modes, clean, calibration, trained)
    if sets:
        from ds_trainer.eval_datasets import datasets_block

        result["datasets"] = datasets_block(sets)
        if len(sets) > 1:  # several shard sets: the top level pools them, each set is in `datasets`
            result["shards"] = None
            result["split"] = ", ".join(sorted({spec.split for spec, _ in sets.values()}))
    if env.is_main:
        from ds_trainer.provenance import provenance

        result["provenance"] = provenance()
        if result["generators"] and bootstrap:
            from ds_trainer.bootstrap import bootstrap_intervals, describe

            result["bootstrap"] = describe(bootstrap, bootstrap_seed)
            result["ci"] = bootstrap_intervals(clean["score"], clean["label"], clean["generator"], resamples=bootstrap,
                                               seed=bootstrap_seed, trained=trained)  # fmt: skip
        result["predictions"] = predictions_block(clean["score"], clean["label"], clean["generator"], clean.get("key"))
        path = Path(out) if out is not None else Path(cfg.logging.run_dir) / f"eval_{source.tag_dir.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_eval_json(_json_safe(result)))
        if result["generators"]:
            console().info("%s", format_protocol_table(result["generators"], result.get("ci")))
            if "ci" in result:
                console().info("[low, high]: 95 %% percentile bootstrap interval, %d resamples, seed %d", bootstrap,
                               bootstrap_seed)  # fmt: skip
        if sets:
            from ds_trainer.eval_datasets import format_datasets

            console().info("%s", format_datasets(result["datasets"]))
        if extra:
            from ds_trainer.eval_tracks import format_tracks

            console().info("%s", format_tracks(extra))
        if modes:
            from ds_trainer.eval_thresholds import format_thresholds

            console().info("%s", format_thresholds(result["thresholds"]))
        crops = f", {cfg.data.eval_crops} native crops each" if cfg.data.eval_crops > 1 else ""
        console().info("%d samples of split %s%s; written to %s", result["samples"], result["split"], crops, path)
        if report_dir is not None:
            _write_report(cfg, path, report_dir)
    return result


def _threshold_modes(cfg: Config, source: Any, asked: Sequence[str | float]) -> tuple[list[str | float], Any]:
    """eval's threshold tables (`asked`, then data.threshold unless 0.5) and the checkpoint's calibration,
    refused before any pass when calibrated is asked of a checkpoint without one."""
    from ds_trainer.eval_thresholds import CALIBRATED, require_calibration, stored_calibration

    modes = list(asked)
    if cfg.data.threshold != 0.5 and cfg.data.threshold not in modes:
        modes.append(cfg.data.threshold)
    calibration = stored_calibration(source.meta)
    if CALIBRATED in modes:
        what = "--threshold calibrated" if CALIBRATED in asked else "data.threshold calibrated"
        require_calibration(calibration, source.tag_dir, what)
    return modes, calibration


def _for_dataset(cfg: Config, spec: DatasetSpec) -> Config:
    """`cfg` scoring one `--shards` set: its directory, its split, all its generators."""
    data = cfg.data.model_copy(update={"shards": str(spec.path), "val_split": spec.split, "eval_generators": None})
    return cfg.model_copy(update={"data": data})


def _pooled(rows: dict[str, Any], preds: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The top-level row and predictions of several sets: every image, generators named NAME/generator."""
    from ds_trainer.eval_datasets import pooled

    clean, table, overall = pooled(preds, {name: row["val_loss"] for name, (_, row) in rows.items()})
    metrics = {f"val_{k}": v for k, v in overall.items()}
    metrics.update(val_samples=sum(r["val_samples"] for _, r in rows.values()), val_generators=table,
                   val_bad_samples=sum(r["val_bad_samples"] for _, r in rows.values()))  # fmt: skip
    return metrics, clean, rows


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
