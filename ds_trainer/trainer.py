"""The Trainer facade: a model and loaders in, a DeepSpeed-trained detector out.

It wires the components and runs the epoch loop; each component owns its mechanism and its state:
engine.py builds the engines (and the derived `RunSettings`), loop.py trains one epoch (the step
reads top to bottom in `TrainLoop._micro_batch`), hooks.py holds what runs around the step,
evaluation.py scores a loader, state.py holds what a resume restores, resume.py reads and writes the
checkpoint's metadata and plans a resume, checkpoint.py stores the files.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_trainer import checkpoint, loaders, optim, resume
from ds_trainer import engine as engines
from ds_trainer.config import Config
from ds_trainer.distributed import DistEnv, init_distributed, torch_device
from ds_trainer.errors import CheckpointError, ConfigError
from ds_trainer.eval_thresholds import fit_on_holdout, validation_row
from ds_trainer.evaluation import evaluate, trained_generators
from ds_trainer.flops import MfuMeter
from ds_trainer.hooks import Hook, Hooks, for_training
from ds_trainer.loop import EpochStart, TrainLoop
from ds_trainer.nonfinite import NonFiniteGuard
from ds_trainer.preemption import PreemptionGuard, save_and_stop
from ds_trainer.run_lock import LockHold, RunLocks
from ds_trainer.seed_api import config_from_keywords
from ds_trainer.sinks import MetricsSinks, configure_logging, console, progress_mode, write_run_config
from ds_trainer.state import BestTracker, TrainState, epoch_checkpoint_due, monitored_value

log = logging.getLogger(__name__)


class Trainer:
    """Fine-tunes `model` with DeepSpeed.

    Takes the seed's keywords (`optimizer_type`, `learning_rate`, `scheduler_type`, `num_epochs`,
    `device`, `checkpoint_dir`, `distributed`, ...) and the YAML `training:` keys alike, so both
    `Trainer(model, tl, vl, learning_rate=1e-4)` and `Trainer(model, tl, vl, **config.training)`
    work; `config=` passes a whole run config (deepspeed and logging sections included); `hooks=`
    adds `ds_trainer.hooks.Hook`s around the training step.
    """

    def __init__(
        self, model: nn.Module, train_loader: Iterable | None = None, val_loader: Iterable | None = None, *,
        config: Config | None = None, device: str | None = None, distributed: bool | None = None,
        zero_stage: int | None = None, precision: str | None = None, run_dir: str | Path | None = None,
        hooks: Sequence[Hook] = (), locks: RunLocks | None = None, **training: Any,
    ) -> None:  # fmt: skip
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.cfg = config_from_keywords(config, training, zero_stage, precision, run_dir)  # never changed after this
        self.t = self.cfg.training
        self.device_request, self.distributed = device, distributed
        self.run_dir = Path(self.cfg.logging.run_dir)
        self.engine: Any = None
        self.env: DistEnv | None = None
        self.device: torch.device | None = None
        self.settings: engines.RunSettings | None = None
        self.progress_mode = "off"  # within an epoch, on this rank: bar, lines or off (sinks.progress_mode)
        self.state = TrainState(BestTracker(self.t.monitor, self.t.monitor_higher_is_better))
        self.preemption = PreemptionGuard()
        self.user_hooks = list(hooks)
        self.history: list[dict[str, Any]] = []
        self.last_predictions: dict[str, Any] | None = None  # the last evaluate()'s per-image scores
        # what the unseen-generators mean leaves out (None: not known); `ds-trainer eval` sets the checkpoint's
        self.trained_generators = trained_generators(self.cfg.model.mode, self.cfg.data.train_generators, train_loader)
        self.mfu: MfuMeter | None = None  # logging.mfu: FLOPs per sample (counted at the first step) vs peak
        self._plan = resume.ResumePlan()
        self.plateau: optim.PlateauScale | None = None
        self._loop: TrainLoop | None = None
        self.hold = LockHold(locks)  # checkpoint_dir's and run_dir's locks: the caller's, or taken here

    @property
    def epoch(self) -> int:  # the last finished epoch
        return self.state.progress.epoch

    def setup(self) -> None:
        """Starts (or joins) the process group and builds the engine; every other method calls it."""
        if self.engine is not None:
            return
        engines.select_device(self.device_request)
        self.env = env = init_distributed(self.cfg.distributed.timeout_s)
        if self.distributed is False and env.world_size > 1:
            raise ConfigError(f"distributed=False, but the job has {env.world_size} ranks")
        self._hold_locks(env)
        try:
            self._build(env)
        except BaseException:
            self.hold.release_own()
            raise

    def _trains(self) -> bool:
        return self.train_loader is not None and any(p.requires_grad for p in self.model.parameters())

    def _hold_locks(self, env: DistEnv) -> None:
        if self._trains():  # a training Trainer holds its directories' locks (collective)
            self.hold.take(self.cfg, env.is_main, env.world_size, owner=self)

    def _build(self, env: DistEnv) -> None:
        configure_logging(env.rank, self.run_dir)
        self.trainable = any(p.requires_grad for p in self.model.parameters())
        if self.val_loader is not None:
            self.val_loader = self._distribute(self.val_loader, train=False)
        if self.trainable and self.train_loader is not None:
            self.train_loader = self._distribute(self.train_loader, train=True)
            s = engines.training_settings(self.cfg, env.world_size, self.train_loader, self.val_loader, self._plan)
            built = engines.build_training_engine(self.model, self.cfg, s)
        else:
            s = engines.eval_settings(self.cfg, env.world_size)
            built = engines.build_eval_engine(self.model, self.cfg, s)
        self.settings, self.engine, self.ds_config = s, built.engine, built.ds_config
        self.group_names, self.plateau = built.group_names, built.plateau
        self.state.best = BestTracker.for_training(self.t, s.monitor)
        self.device = torch_device(env)
        self.nonfinite = NonFiniteGuard(self.t.on_nonfinite, self.t.max_nonfinite_steps, self.device, env.world_size)
        workers = max(loaders.workers(self.train_loader), loaders.workers(self.val_loader))
        self.input_dtype = engines.ready(self.engine, self.cfg, self.device, workers)
        if self.cfg.logging.mfu and self.engine.optimizer is not None:
            self.mfu = MfuMeter.for_device(self.device, self.input_dtype, self.cfg.logging.peak_tflops, env.world_size)
        if env.is_main and self.train_loader is not None:
            # A run's record; an evaluation (`ds-trainer eval` on a live run's checkpoint) leaves it alone.
            write_run_config(self.run_dir, self.cfg.to_yaml(), self.ds_config)
        self.sinks = MetricsSinks(self.run_dir, env.is_main, self.cfg.logging, run_name=self.cfg.name,
                                  run_config=self.cfg.to_dict(), num_epochs=self.t.num_epochs)  # fmt: skip
        self.progress_mode = progress_mode(env.is_main, self.cfg.logging.progress_bar)
        if self.engine.optimizer is None:
            why = "no trainable parameters" if not self.trainable else "no train_loader"
            log.info("%s: evaluation only (world size %d)", why, env.world_size)
            return
        self._loop = TrainLoop(
            self.engine, self.train_loader, settings=s, loss_fn=self.calculate_loss, dtype=self.input_dtype,
            nonfinite=self.nonfinite, hooks=Hooks(), max_bad_fraction=self.cfg.data.max_bad_fraction,
            show_progress=self.progress_mode == "bar", num_epochs=self.t.num_epochs, mfu=self.mfu,
        )  # fmt: skip
        log.info("%s", engines.describe(s, self.input_dtype, self.model, self.group_names))

    def _distribute(self, loader: Iterable, train: bool) -> Iterable:
        assert self.env is not None
        return loaders.distribute(loader, self.env.rank, self.env.world_size, self.cfg.seed, train)

    def calculate_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the logits; override for a custom loss (the seed's CustomTrainer)."""
        return F.cross_entropy(outputs.float(), targets)

    def evaluate(self, loader: Iterable | None = None) -> dict[str, Any]:
        """Loss, accuracy, ROC AUC, AP (per generator where named) over the whole set, from every rank."""
        self.setup()
        assert self.env is not None and self.settings is not None
        loader = self.val_loader if loader is None else self._distribute(loader, train=False)
        if loader is None:
            raise ConfigError("evaluate(): no val_loader was given")
        result = evaluate(self.engine, loader, epoch=self.epoch, zero_stage=self.settings.zero_stage, dtype=self.input_dtype,
                          loss_fn=self.calculate_loss, image_size=int(getattr(self.model, "image_size", 224)),
                          max_bad_fraction=self.cfg.data.max_bad_fraction, trained=self.trained_generators)  # fmt: skip
        self.last_predictions = result.predictions
        return result.row

    def evaluate_and_log(self) -> dict[str, Any]:
        """Evaluate once and write the row to the sinks (a zero-shot run's whole job)."""
        self.setup()
        with self.sinks:
            row: dict[str, Any] = {"epoch": self.epoch, **self.evaluate(), "step": int(self.engine.global_steps)}
            self.sinks.write(row)
            self.sinks.pr_curves(row["step"], self.last_predictions)
        return row

    def save_checkpoint(self, tag: str, update_latest: bool = True) -> Path:
        self.setup()
        self._require_training("save_checkpoint()")
        assert self.settings is not None
        self.nonfinite.check()  # the deferred loss check first: its message names the batch
        engines.check_weights_finite(self.engine, self.settings.world_size, tag, self.t.checkpoint_dir)
        self.state.plateau = self.plateau.state_dict() if self.plateau is not None else None
        meta = resume.metadata(self.state.state_dict(), self.engine, world_size=self.settings.world_size,
                               zero_stage=self.settings.zero_stage, model=self.model, group_names=self.group_names,
                               config=self.cfg.to_dict())  # fmt: skip
        tag_dir = checkpoint.save(self.engine, self.t.checkpoint_dir, tag, meta, update_latest)
        console().info("Saving checkpoint to: %s", tag_dir)
        return tag_dir

    def resume_from_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, LR scheduler (plateau state too), epoch, step and best metric.

        `path` is a checkpoint directory (its newest complete tag is used), a tag directory, or
        the seed's `.../epoch_N.pth`. `train()` then continues with the next epoch. Call it before
        `train()`, so the engine is built for the checkpoint (another world size, an older layout).
        """
        load_dir, tag = checkpoint.resolve(path)
        meta = resume.read(load_dir / tag)
        training = self.train_loader is not None and not meta.split_groups
        groups = [g["name"] for g in optim.param_groups(self.model, self.t)] if training else None
        resume.check_same_model(meta, self.model, groups)
        if self.engine is None:
            engines.select_device(self.device_request)
            env = init_distributed(self.cfg.distributed.timeout_s)
            self._hold_locks(env)  # before the conversion writes into the checkpoint
            micro = getattr(self.train_loader, "batch_size", None) or self.t.batch_size
            try:
                self._plan = resume.prepare(meta, env.world_size, micro, self.t.grad_accumulation_steps, env.is_main)
            except BaseException:
                self.hold.release_own()
                raise
        elif meta.world_size and self.env is not None and meta.world_size != self.env.world_size:
            raise CheckpointError(
                f"{meta.tag_dir} was saved by {meta.world_size} ranks, this job has {self.env.world_size}: call "
                "resume_from_checkpoint() before train()/evaluate(), so the engine is built for it"
            )
        else:
            resume.verify_files(meta)
        self.setup()
        self._require_training("resume_from_checkpoint()")
        assert self.env is not None
        resume.load_engine(self.engine, meta, universal=self._plan.universal)
        resume.warn_if_config_differs(meta, self.cfg.to_dict(), is_main=self.env.is_main,
                                      ignore=resume.ignored_differences(self._plan))  # fmt: skip
        self.state.load_state_dict(meta.state)
        resume.continue_cosine(self.engine, meta, self.t, self.ds_config, self.epoch, self.env.is_main)
        if self.plateau is not None:
            self.plateau.restore(self.state.plateau, self.engine.lr_scheduler)
        self.sinks.rewind(self.epoch, int(self.engine.global_steps))
        if self.env.is_main:
            (load_dir / checkpoint.PREEMPTED).unlink(missing_ok=True)  # this is the resume it asked for
        log.info("resumed from %s at epoch %d, global step %d; training to epoch %d", meta.tag_dir, self.epoch,
                 self.engine.global_steps, self.t.num_epochs)  # fmt: skip
        return meta.state

    def _require_training(self, what: str) -> None:
        engines.require_training(self.trainable, self.train_loader is not None, what)

    def train(self) -> list[dict[str, Any]]:
        """Train from the epoch after the last finished one to `num_epochs`; returns the metric rows."""
        with contextlib.ExitStack() as lifetime:  # released in reverse order, however the epochs end
            lifetime.callback(self.hold.release_own)
            self.setup()
            self._require_training("train()")
            assert self.env is not None and self._loop is not None
            self._hold_locks(self.env)  # a second train() of this Trainer: its first one released them
            if self.epoch >= self.t.num_epochs and not self.state.progress.batches_done:
                console().info("%s", resume.nothing_to_train(self.epoch, self.t.num_epochs))
                return self.history
            lifetime.enter_context(self.preemption.installed())
            lifetime.enter_context(self.sinks)
            lock = self.hold.locks if self.env.is_main else None
            self._loop.hooks = for_training(
                self.engine, self.model, self.sinks, self.settings, self.cfg.logging.log_every_n_steps,
                self.group_names, self.nonfinite, self.mfu, lock, self.env.rank, self.preemption, self.user_hooks,
                progress_lines=self.progress_mode == "lines", num_epochs=self.t.num_epochs,
            )  # fmt: skip
            for epoch in range(self.epoch + 1, self.t.num_epochs + 1):
                # From the epoch's start, or, after a preemption, from where the saved run stopped.
                start = EpochStart(*self.state.progress.take_start(self.env.rank, self.env.world_size))
                result = self._loop.run_epoch(epoch, start)
                if result.preempted:
                    save_and_stop(self, epoch, result)  # raises Preempted (exit 75)
                if self.end_epoch(epoch, result.row or {}):
                    break
            if (best := self.state.best).best_row is not None:
                console().info("Best checkpoint: %s", best.summary(Path(self.t.checkpoint_dir) / checkpoint.BEST))
        return self.history

    def end_epoch(self, epoch: int, train_row: dict[str, Any]) -> bool:
        """Validation, the row, best/early stopping/plateau, the epoch's checkpoints; True: stop early."""
        assert self.env is not None and self.settings is not None
        row: dict[str, Any] = {"epoch": epoch, **train_row}
        if self.val_loader is not None:
            row.update(self.evaluate())
            cal = fit_on_holdout(self.cfg.data, self.last_predictions, epoch)  # None without a holdout
            self.state.calibration = cal or self.state.calibration
            row.update(validation_row(self.cfg.data, self.last_predictions, cal, self.trained_generators))
        row["step"] = int(self.engine.global_steps)
        row["lr"] = float(self.engine.get_lr()[0])
        self.state.progress.epoch = epoch
        monitor = self.settings.monitor
        value = monitored_value(row, monitor, epoch)
        verdict = self.state.best.update(value, row)
        if self.plateau is not None and self.plateau.step(value, self.engine.lr_scheduler):
            console().info("Plateau: %s did not improve; LR scale now %.3g", monitor, self.plateau.scale)
        row["monitor"] = monitor
        self.sinks.write(row)
        self.sinks.pr_curves(row["step"], self.last_predictions if self.val_loader is not None else None)
        self.history.append(row)
        if epoch_checkpoint_due(epoch, self.t.num_epochs, self.t.save_frequency, verdict.stop):
            saved = self.save_checkpoint(checkpoint.epoch_tag(epoch)).name
            checkpoint.after_epoch_save(self.t.checkpoint_dir, saved, verdict.improved, row["step"], self.t.keep_last,
                                        self.env.rank, self.env.is_main)  # fmt: skip
        elif verdict.improved:  # no epoch tag to link: best in full
            self.save_checkpoint(checkpoint.BEST, update_latest=False)
        if verdict.stop:
            console().info("Early stopping: %s has not improved for %d epochs (best %.4f)", monitor,
                           self.state.best.epochs_without_improvement, self.state.best.best_metric)  # fmt: skip
        return verdict.stop
