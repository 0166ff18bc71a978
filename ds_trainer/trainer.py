"""The Trainer facade: a model and loaders in, a DeepSpeed-trained detector out.

One training step, top to bottom: `_train_epoch` → `engine(inputs)` → `calculate_loss` →
`engine.backward` → `engine.step`. The host reads from the device every `log_every_n_steps`
optimizer steps (loss, grad norm, samples/s, MFU, and the deferred non-finite check), not per step;
only `training.on_nonfinite: skip` needs a one-element sync per micro-batch (see nonfinite.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from ds_trainer import checkpoint, faults, optim
from ds_trainer.config import Config, TrainingSection, build_config
from ds_trainer.distributed import DistEnv, detect_device, init_distributed, reserve_cpu_threads, torch_device
from ds_trainer.ds_compat import patch_universal_loading
from ds_trainer.ds_config import build_ds_config
from ds_trainer.ds_config import optimizer_steps_per_epoch as optim_steps_per_epoch
from ds_trainer.errors import CheckpointError, ConfigError, DataError, Preempted, TrainingError, first_line
from ds_trainer.flops import FlopTally, MfuMeter, peak_flops
from ds_trainer.metrics import (
    ai_scores,
    all_reduce_max_int,
    all_reduce_sum,
    binary_metrics,
    gather_1d,
    gather_objects,
    per_generator_metrics,
)
from ds_trainer.nonfinite import NonFiniteGuard
from ds_trainer.preemption import PreemptionGuard
from ds_trainer.sinks import MetricsSinks, configure_logging, console, progress_enabled

log = logging.getLogger(__name__)

# The seed's keyword names → the YAML `training:` keys they set.
_SEED_ALIASES = {"optimizer_type": "optimizer", "scheduler_type": "scheduler"}
_TRAINING_KEYS = set(TrainingSection.model_fields)


class _EvalSampler(Sampler[int]):
    """Rank r takes indices r, r+W, r+2W, ...: every sample exactly once, no padding duplicates."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class Trainer:
    """Fine-tunes `model` with DeepSpeed.

    Takes the seed's keywords (`optimizer_type`, `learning_rate`, `scheduler_type`, `num_epochs`,
    `device`, `checkpoint_dir`, `distributed`, ...) and the YAML `training:` keys alike, so both
    `Trainer(model, tl, vl, learning_rate=1e-4)` and `Trainer(model, tl, vl, **config.training)`
    work; `config=` passes a whole run config (deepspeed and logging sections included).
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable | None = None,
        val_loader: Iterable | None = None,
        *,
        config: Config | None = None,
        device: str | None = None,
        distributed: bool | None = None,
        zero_stage: int | None = None,
        precision: str | None = None,
        run_dir: str | Path | None = None,
        **training: Any,
    ) -> None:
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.cfg = self._resolve_config(config, training, zero_stage, precision, run_dir)
        self.t = self.cfg.training
        self.device_request = device
        self.distributed = distributed
        self.engine: Any = None
        self.env: DistEnv | None = None
        self.device: torch.device | None = None
        self.run_dir = Path(self.cfg.logging.run_dir)
        self.epoch = 0  # last finished epoch
        self.best_metric: float | None = None
        self.best_row: dict[str, Any] | None = None
        self.epochs_without_improvement = 0
        self.plateau: optim.PlateauScale | None = None
        self.preemption = PreemptionGuard()
        self._universal = False  # load the checkpoint through DeepSpeed's universal format
        self._skip_batches = 0  # batches of the next epoch a preempted run had already trained on
        self._data_state: dict[str, Any] | None = None  # the train loader's position at that point
        # The interrupted epoch's train totals over all ranks (loss sum, correct, seen, bad, non-finite):
        # saved with a preemption, added back on resume so the epoch's row covers all of its batches.
        self._partial_totals: list[float] | None = None
        self._split_groups = False  # resuming a checkpoint that predates merged parameter groups
        self.history: list[dict[str, Any]] = []
        self.last_predictions: dict[str, Any] | None = None  # the last evaluate()'s per-image scores
        self._lock: Any = None  # checkpoint_dir's DirLock while train() runs (rank 0)
        self._micro_steps = 0  # micro-batches trained in this process (fault injection counts them)
        self.nonfinite: NonFiniteGuard | None = None  # training.on_nonfinite, from _setup on
        self.mfu: MfuMeter | None = None  # logging.mfu: FLOPs per sample (counted at the first step) vs peak
        self._data_wait = 0.0  # seconds this epoch's loop spent blocked on the train loader
        self._rate_mark = (0.0, 0)  # (perf_counter, global step) of the last samples/s + MFU reading

    # ----------------------------------------------------------------- config
    @staticmethod
    def _resolve_config(
        config: Config | None,
        training: dict[str, Any],
        zero_stage: int | None,
        precision: str | None,
        run_dir: str | Path | None,
    ) -> Config:
        tree: dict[str, Any] = config.to_dict() if config is not None else {}
        section = tree.setdefault("training", {})
        for key, value in training.items():
            name = _SEED_ALIASES.get(key, key)
            if name not in _TRAINING_KEYS:
                raise ConfigError(
                    f"Trainer(): unknown keyword {key!r}; training keywords are "
                    f"{', '.join(sorted(_TRAINING_KEYS | set(_SEED_ALIASES)))}"
                )
            if name in ("optimizer", "scheduler") and isinstance(value, str):
                value = value.lower()
            section[name] = value
        if zero_stage is not None:
            tree.setdefault("deepspeed", {})["zero_stage"] = zero_stage
        if precision is not None:
            tree.setdefault("deepspeed", {})["precision"] = precision
        if run_dir is not None:
            tree.setdefault("logging", {})["run_dir"] = str(run_dir)
        elif config is None:
            # Seed-style use: outputs go next to the checkpoints.
            tree.setdefault("logging", {})["run_dir"] = str(section.get("checkpoint_dir", "results/saved_models"))
        return build_config(tree, source="Trainer()")

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        if self.engine is not None:
            return
        self._select_device()
        self.env = env = init_distributed(self.cfg.distributed.timeout_s)
        if self.distributed is False and env.world_size > 1:
            raise ConfigError(f"distributed=False, but the job has {env.world_size} ranks")
        configure_logging(env.rank, self.run_dir)
        self.trainable = any(p.requires_grad for p in self.model.parameters())
        if self.val_loader is not None:
            self.val_loader = self._distribute(self.val_loader, train=False)
        if self.trainable and self.train_loader is not None:
            self._init_training_engine(env)
        else:
            self._init_eval_engine(env)
        self.device = torch_device(env)
        self.nonfinite = NonFiniteGuard(self.t.on_nonfinite, self.t.max_nonfinite_steps, self.device, env.world_size)
        if self.device.type == "cpu":
            # Near convergence Adam's moments underflow into denormals, which x86 CPUs process
            # ~100x slower (measured: 5 vs 350 samples/s on the tiny model); flush them to zero.
            torch.set_flush_denormal(True)
            threads = reserve_cpu_threads(max(self._loader_workers(self.train_loader), self._loader_workers(self.val_loader)))
            if threads is not None:
                log.info("torch threads: %d (one core left to each train loader worker)", threads)
        self.input_dtype = (
            torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float16 if self.engine.fp16_enabled() else torch.float32
        )
        if self.cfg.model.compile:
            # nn.Module.compile() in place: the state_dict keys (and so checkpoints) do not change.
            self.engine.compile()
        if self.cfg.logging.mfu and self.engine.optimizer is not None:
            peak = peak_flops(self.device, self.input_dtype, self.cfg.logging.peak_tflops)
            self.mfu = MfuMeter(peak, env.world_size)
            log.info("mfu: peak %.1f TFLOP/s per device (%s)", peak.per_device / 1e12, peak.source)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        self.sinks = MetricsSinks(
            self.run_dir, env.is_main, self.cfg.logging, run_name=self.cfg.name, run_config=self.cfg.to_dict()
        )
        if self.engine.optimizer is not None:
            log.info(
                "world size %d, %d micro-batches of %d per rank per epoch, precision %s, ZeRO stage %d, "
                "%d trainable parameters in groups %s",
                env.world_size, self.steps_per_epoch, self.t.batch_size, self.input_dtype,
                self.cfg.deepspeed.zero_stage, sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                ", ".join(self.group_names),
            )  # fmt: skip
        else:
            why = "no trainable parameters" if not self.trainable else "no train_loader"
            log.info("%s: evaluation only (world size %d)", why, env.world_size)

    def _init_training_engine(self, env: DistEnv) -> None:
        import deepspeed

        if self.train_loader is None:
            raise ConfigError("Trainer: train_loader is required to train (or resume)")
        self.train_loader = self._distribute(self.train_loader, train=True)
        self._check_batch_size()
        self._check_monitor()
        steps = len(self.train_loader)  # type: ignore[arg-type]
        self.steps_per_epoch = steps
        self.ds_config = build_ds_config(self.cfg, env.world_size, steps, detect_device())
        if self._universal:
            self.ds_config["checkpoint"] = {"load_universal": True}
            patch_universal_loading()
        groups = optim.param_groups(self.model, self.t, split_parts=self._split_groups)
        self.group_names = [g["name"] for g in groups]
        lr_scheduler = None
        if self.t.scheduler in ("step", "plateau"):
            factor = optim.step_lr_factor(self.t, optim_steps_per_epoch(self.cfg, steps))
            lr_scheduler = optim.make_lambda_scheduler(factor)
            if self.t.scheduler == "plateau":
                self.plateau = optim.PlateauScale(self.t, factor)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=groups, config=self.ds_config, lr_scheduler=lr_scheduler
        )
        sched = self.engine.lr_scheduler
        if self.t.scheduler == "cosine" and getattr(sched, "last_batch_iteration", None) == -1:
            # WarmupCosineLR starts at iteration -1, where its LR is 0, and iteration 0 is 0 too
            # under a linear warmup: two wasted steps. Start at 1 so optimizer step n runs at
            # iteration n: warmup n/W, and the last step lands exactly on min_lr.
            sched.step(1)
        self.preemption.install()

    def _init_eval_engine(self, env: DistEnv) -> None:
        """An engine without optimizer for a model with nothing to train (zero-shot CLIP)."""
        import deepspeed

        cfg = self.cfg.model_copy(deep=True)
        if cfg.deepspeed.zero_stage in (1, 2):
            cfg.deepspeed.zero_stage = 0  # ZeRO 1/2 shard optimizer state, and there is none
        self.cfg.deepspeed.zero_stage = cfg.deepspeed.zero_stage
        self.steps_per_epoch = 0
        self.group_names = []
        ds = build_ds_config(cfg, env.world_size, max(1, self.t.grad_accumulation_steps), detect_device())
        for key in ("optimizer", "scheduler", "gradient_clipping", "zero_allow_untested_optimizer"):
            ds.pop(key, None)
        ds["zero_optimization"].pop("offload_optimizer", None)
        self.ds_config = ds
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, config=ds)

    def _check_monitor(self) -> None:
        """Early stopping, `best` and plateau follow `training.monitor`; a val_* metric needs a val_loader."""
        if self.val_loader is not None or not self.t.monitor.startswith("val_"):
            return
        if "monitor" in self.t.model_fields_set or self.t.scheduler == "plateau":
            why = " (the plateau scheduler follows it)" if self.t.scheduler == "plateau" else ""
            raise ConfigError(
                f"training.monitor is {self.t.monitor}{why}, but there is no validation set: set data.val_split "
                "or data.holdout_fraction (from Python: pass a val_loader), or monitor train_loss / train_acc"
            )
        log.info("no val_loader: monitoring train_loss instead of %s", self.t.monitor)
        self.t.monitor = "train_loss"

    def _select_device(self) -> None:
        request = self.device_request
        if request is None:
            return
        kind = str(request).split(":")[0]
        if kind == "cpu":
            # DeepSpeed picks its accelerator once, on first use; this must come before that.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        elif kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda', but no CUDA device is visible; use device='cpu' or None (auto)")

    def _distribute(self, loader: Iterable, train: bool) -> Iterable:
        """Give a plain DataLoader over a map-style dataset a per-rank sampler, as Lightning does."""
        assert self.env is not None
        if self.env.world_size == 1 or not isinstance(loader, DataLoader):
            return loader
        if isinstance(loader.sampler, (DistributedSampler, _EvalSampler)) or loader.batch_sampler is None:
            return loader
        dataset = loader.dataset
        if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
            return loader
        if train:
            shuffle = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
            # drop_last: every rank must run the same number of steps, or the last collective hangs.
            sampler: Sampler[int] = DistributedSampler(
                dataset, self.env.world_size, self.env.rank, shuffle=shuffle, seed=self.cfg.seed, drop_last=True
            )
        else:
            sampler = _EvalSampler(len(dataset), self.env.rank, self.env.world_size)
        return DataLoader(
            dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=train,
        )

    @staticmethod
    def _loader_workers(loader: Iterable | None) -> int:
        """Worker processes a train loader runs beside the step (a ShardLoader's planned ones)."""
        if loader is None:
            return 0
        if hasattr(loader, "plan"):
            return int(loader.plan().num_workers)
        return int(getattr(loader, "num_workers", 0) or 0)

    def _check_batch_size(self) -> None:
        loader_bs = getattr(self.train_loader, "batch_size", None)
        if loader_bs is None:
            return
        explicit = "batch_size" in self.t.model_fields_set
        if explicit and loader_bs != self.t.batch_size:
            raise ConfigError(
                f"training.batch_size is {self.t.batch_size}, but train_loader yields batches of {loader_bs}; "
                "make them agree (DeepSpeed needs the true micro-batch size)"
            )
        if loader_bs != self.t.batch_size:
            self.t.batch_size = loader_bs

    # ------------------------------------------------------------------- step
    def calculate_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the logits; override for a custom loss (the seed's CustomTrainer)."""
        return F.cross_entropy(outputs.float(), targets)

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, Mapping):
            inputs, targets = batch["pixel_values"], batch["labels"]
        elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
            inputs, targets = batch[0], batch[1]
        else:
            raise TypeError(
                "a batch must be a dict with 'pixel_values' and 'labels', or an (images, labels) pair; "
                f"got {type(batch).__name__}"
            )
        assert self.device is not None
        inputs = inputs.to(self.device, dtype=self.input_dtype, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        return inputs, targets

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        engine, loader = self.engine, self.train_loader
        assert self.env is not None and self.device is not None and loader is not None
        self._set_epoch(loader, epoch)
        engine.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = torch.zeros((), device=self.device)
        bad = nonfinite = 0
        every = self.cfg.logging.log_every_n_steps
        bar = tqdm(
            total=len(loader), desc=f"Epoch {epoch}/{self.t.num_epochs}",
            disable=not progress_enabled(self.env.is_main, self.cfg.logging.progress_bar),
            dynamic_ncols=True, mininterval=1.0,
        )  # fmt: skip
        start = time.perf_counter()
        skip, self._skip_batches = self._skip_batches, 0
        offset = 0  # batches of this epoch before the loop's first (a fast-forwarded resume)
        if skip and self._data_state is not None and hasattr(loader, "load_state_dict"):
            # The loader fast-forwards its streams itself, without decoding what it skips.
            loader.load_state_dict(self._data_state)
            log.info("epoch %d: continuing after the %d batches trained on before the preemption", epoch, skip)
            skip, offset = 0, skip
        elif skip:
            log.info("epoch %d: skipping the %d batches trained on before the preemption", epoch, skip)
        self._data_state = None
        self._data_wait = 0.0
        self._rate_mark = (start, int(engine.global_steps))
        for i, batch in enumerate(self._timed(loader)):
            if i < skip:
                # The loader is seeded per epoch, so the batches after these are the ones the
                # interrupted run would have seen next.
                bar.update(1)
                continue
            inputs, targets = self._unpack(batch)
            if isinstance(batch, Mapping):
                bad += int(batch.get("bad_samples", 0))
            flops = FlopTally() if self.mfu is not None and self.mfu.flops_per_sample is None else None
            with flops.count() if flops is not None else contextlib.nullcontext():
                outputs = engine(inputs)
                loss = self.calculate_loss(outputs, targets)
            self._micro_steps += 1
            if faults.nan_loss(self._micro_steps, self.env.rank):
                loss = loss * float("nan")
            keys = batch.get("key", ()) if isinstance(batch, Mapping) else ()
            if not self.nonfinite.admit(loss, self._micro_steps, epoch, int(engine.global_steps) + 1, keys):
                # No backward and no engine.step(): this batch never reaches an update (on_nonfinite skip).
                nonfinite += 1
                bar.update(1)
                continue
            with flops.count() if flops is not None else contextlib.nullcontext():
                engine.backward(loss)
            if flops is not None:
                self.mfu.flops_per_sample = flops.total / targets.shape[0]
                log.info("mfu: %.3g GFLOP per sample (forward + backward, counted)", self.mfu.flops_per_sample / 1e9)
            boundary = engine.is_gradient_accumulation_boundary()
            # The LR this optimizer step applies (the scheduler moves it inside engine.step()).
            lrs = engine.get_lr() if boundary else None
            log_now = boundary and (engine.global_steps + 1) % every == 0
            norm = self._grad_norm_before_step() if log_now else None
            engine.step()
            n = targets.shape[0]
            loss_sum += loss.detach().float() * n
            correct += (ai_scores(outputs) >= 0.5).long().eq(targets).sum()
            seen += n
            bar.update(1)
            if lrs is not None:
                if log_now:
                    self.nonfinite.check()  # stop: raise before a non-finite loss is logged as a number
                self._log_step(lrs, loss if log_now else None, norm, bar)
                if self._lock is not None:
                    self._lock.refresh()
                faults.after_step(int(engine.global_steps), self.env.rank)
                if self.preemption.should_stop():
                    bar.close()
                    partial = [loss_sum, correct, seen, torch.tensor(float(bad), device=self.device)]
                    self._save_preempted(epoch, batches_done=offset + i + 1, partial=partial, nonfinite=nonfinite)
        bar.close()
        elapsed = time.perf_counter() - start
        self.nonfinite.check()
        local = [loss_sum, correct, seen, torch.tensor(float(bad), device=self.device),
                 torch.tensor(self._data_wait, device=self.device)]  # fmt: skip
        totals = all_reduce_sum(torch.stack([x.float() for x in local]))
        loss_total, correct_total, seen_total, bad_total, wait_total = (float(x) for x in totals.tolist())
        # A resumed epoch: its batches before the preemption count too (the rate is this process's alone).
        carried, self._partial_totals = self._partial_totals or [0.0] * 5, None
        epoch_seen = seen_total + carried[2]
        if epoch_seen == 0:
            raise ConfigError("the train loader yielded no batches")
        self._check_bad(int(bad_total + carried[3]), int(epoch_seen), "training")
        row = {
            "train_bad_samples": int(bad_total + carried[3]),
            "train_nonfinite_steps": nonfinite + int(carried[4]),  # the same on every rank: they skip together
            "train_loss": (loss_total + carried[0]) / epoch_seen,
            "train_acc": (correct_total + carried[1]) / epoch_seen,
            "samples_per_s": seen_total / elapsed if elapsed > 0 and seen_total else math.nan,
            "epoch_time_s": elapsed,
            # Mean over ranks of the time the loop sat in next(loader): > a few % means the loader is the bottleneck.
            "data_wait_s": wait_total / self.env.world_size,
            "data_wait_fraction": wait_total / self.env.world_size / elapsed if elapsed > 0 else math.nan,
        }
        if self.mfu is not None and self.mfu.flops_per_sample and seen_total:
            row["mfu"] = self.mfu.mfu(seen_total, elapsed)
            row["train_tflops"] = self.mfu.achieved_tflops(seen_total, elapsed)
        return row

    def _timed(self, loader: Iterable) -> Iterator[Any]:
        """The loader's batches, adding the time spent waiting for each to `_data_wait`."""
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._data_wait += time.perf_counter() - t0
            yield batch

    def _check_weights_finite(self, tag: str) -> None:
        """Never write (or call best) a checkpoint whose weights hold NaN/Inf."""
        # ZeRO-3: each rank checks its own partition (ds_tensor). One flag, one host sync.
        flags = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all() for p in self.engine.module.parameters()]
        bad = (~torch.stack(flags)).any().float().reshape(1) if flags else torch.zeros(1, device=self.device)
        if self.env is not None and self.env.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bool(bad.item()):
            raise TrainingError(
                f"not saving {tag}: the weights hold NaN/Inf (step {int(self.engine.global_steps)}). The last "
                f"complete checkpoint in {self.t.checkpoint_dir} is untouched; lower training.learning_rate and resume"
            )

    def _gather_data_state(self) -> list[Any] | None:
        state = self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None
        return gather_objects([state])

    def _save_preempted(self, epoch: int, batches_done: int, partial: list[torch.Tensor], nonfinite: int) -> None:
        """Every rank agreed to stop at this step: save where we are, then exit with code 75.

        This may be the epoch's last batch: the epoch is then trained but not evaluated, and the
        resume finishes it (its row, evaluation and checkpoint) from the saved train totals.
        """
        step = int(self.engine.global_steps)
        totals = all_reduce_sum(torch.stack([x.float() for x in partial])).tolist() + [float(nonfinite)]
        carried = self._partial_totals or [0.0] * 5  # a second preemption in a resumed epoch keeps the first part
        self._partial_totals = [float(x) + c for x, c in zip(totals, carried)]
        self._batches_done = batches_done
        tag_dir = self.save_checkpoint(checkpoint.step_tag(step))
        self._batches_done = 0
        self._partial_totals = None
        assert self.env is not None
        if self.env.is_main:
            checkpoint.mark_preempted(self.t.checkpoint_dir, tag_dir.name, step)
        self.sinks.close()
        raise Preempted(
            f"{self.preemption.signal_name} received: saved {tag_dir} at step {step} "
            f"({batches_done} batches into epoch {epoch}); resume with --load-dir {self.t.checkpoint_dir}"
        )

    def _grad_norm_before_step(self) -> torch.Tensor | None:
        """ZeRO and the bf16 optimizer compute the global norm in step(); fp32 ZeRO-0 does not.

        There, gradients are already all-reduced after the boundary backward, so the norm over
        local `.grad` is the global one (before clipping, as DeepSpeed reports it).
        """
        if self.cfg.deepspeed.zero_stage != 0 or self.engine.bfloat16_enabled() or self.engine.fp16_enabled():
            return None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else None

    def _log_step(self, lrs: list[float], loss: torch.Tensor | None, norm: torch.Tensor | None, bar: Any) -> None:
        """Every optimizer step: the LR applied; every log_every_n_steps: loss and grad norm too."""
        step = int(self.engine.global_steps)
        scalars: dict[str, float] = {"train/lr": float(lrs[0])}
        backbone = [lr for name, lr in zip(self.group_names, lrs) if name.startswith("backbone")]
        if backbone and len(backbone) < len(lrs):
            scalars["train/lr_backbone"] = float(backbone[0])
        if loss is not None:
            scalars["train/loss"] = float(loss.item())
            if norm is None:
                norm = self.engine.get_global_grad_norm()
            if norm is not None:
                scalars["train/grad_norm"] = float(norm)
            bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{lrs[0]:.2e}")
            scalars.update(self._rates(step))
        self.sinks.step(step, scalars)

    def _rates(self, step: int) -> dict[str, float]:
        """samples/s (all ranks) and MFU since the last reading: wall time, so data waits count."""
        now = time.perf_counter()
        (then, then_step), self._rate_mark = self._rate_mark, (now, step)
        assert self.env is not None
        samples = (step - then_step) * self.t.batch_size * self.t.grad_accumulation_steps * self.env.world_size
        if samples <= 0 or now <= then:
            return {}
        rates = {"train/samples_per_s": samples / (now - then)}
        mfu = self.mfu.mfu(samples, now - then) if self.mfu is not None else None
        if mfu is not None:
            rates["train/mfu"] = mfu
        return rates

    @staticmethod
    def _set_epoch(loader: Iterable, epoch: int) -> None:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif isinstance(loader, DataLoader) and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)

    # ------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, loader: Iterable | None = None) -> dict[str, float]:
        """Loss, accuracy and ROC AUC over the whole validation set, gathered from every rank."""
        self._setup()
        loader = self.val_loader if loader is None else self._distribute(loader, train=False)
        if loader is None:
            raise ConfigError("evaluate(): no val_loader was given")
        engine = self.engine
        assert self.device is not None
        engine.eval()
        self._set_epoch(loader, self.epoch)
        n_local = len(loader)  # type: ignore[arg-type]
        # Ranks can hold different numbers of batches. Under ZeRO-3 every forward gathers
        # parameters collectively, so short ranks must keep stepping with a dummy batch.
        n_steps = all_reduce_max_int(n_local, self.device) if self.cfg.deepspeed.zero_stage == 3 else n_local
        scores, labels, generators = [], [], []
        loss_sum = torch.zeros((), device=self.device)
        bad = 0
        it = iter(loader)
        dummy: torch.Tensor | None = None
        for i in range(n_steps):
            batch = next(it, None) if i < n_local else None
            if batch is None:
                if dummy is None:
                    size = int(getattr(self.model, "image_size", 224))
                    dummy = torch.zeros(1, 3, size, size, device=self.device, dtype=self.input_dtype)
                engine(dummy)
                continue
            inputs, targets = self._unpack(batch)
            dummy = inputs[:1]
            outputs = engine(inputs)
            loss_sum += self.calculate_loss(outputs, targets).detach().float() * targets.shape[0]
            scores.append(ai_scores(outputs))
            labels.append(targets)
            if isinstance(batch, Mapping):
                bad += int(batch.get("bad_samples", 0))
                if "generator" in batch:
                    generators.extend(batch["generator"])
        engine.train()
        all_scores = gather_1d(torch.cat(scores) if scores else torch.zeros(0))
        all_labels = gather_1d(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
        total_loss = float(all_reduce_sum(loss_sum).item())
        n = all_labels.numel()
        m = binary_metrics(all_scores.cpu().numpy(), all_labels.cpu().numpy())
        row: dict[str, Any] = {
            "val_loss": total_loss / n if n else math.nan,
            "val_acc": m["acc"],
            "val_auc": m["auc"],
            "val_ap": m["ap"],
            "val_real_acc": m["real_acc"],
            "val_fake_acc": m["fake_acc"],
            "val_samples": n,
        }
        row["val_bad_samples"] = int(all_reduce_sum(torch.tensor([bad], device=self.device)).item())
        self._check_bad(row["val_bad_samples"], n, "validation")
        # Same decision on every rank (a collective follows): the streaming loader names generators.
        all_generators = gather_objects(generators) if hasattr(loader, "generators") else []
        # Every image's score, for the report (ROC curves, histograms) and TensorBoard's PR curves.
        self.last_predictions = {
            "score": all_scores.float().cpu().numpy(),
            "label": all_labels.cpu().numpy(),
            "generator": all_generators if len(all_generators) == n else None,
        }
        if all_generators and len(all_generators) == n:
            # The benchmark protocol: every generator on its own, then their unweighted mean.
            table = per_generator_metrics(all_scores.cpu().numpy(), all_labels.cpu().numpy(), all_generators)
            row["val_generators"] = table
            row.update({f"val_mean_{k}": v for k, v in table["mean"].items()})
        return row

    def _check_bad(self, bad: int, good: int, what: str) -> None:
        limit = self.cfg.data.max_bad_fraction
        total = bad + good
        if total and bad / total > limit:
            raise DataError(
                f"{bad} of {total} {what} samples ({bad / total:.1%}) could not be decoded, above "
                f"data.max_bad_fraction {limit:g}; re-create the shards (ds-trainer shard verifies every image) "
                "or raise the limit"
            )

    def evaluate_and_log(self) -> dict[str, Any]:
        """Evaluate once and write the row to the sinks (a zero-shot run's whole job)."""
        row: dict[str, Any] = {"epoch": self.epoch}
        row.update(self.evaluate())
        row["step"] = int(self.engine.global_steps)
        self.sinks.write(row)
        self.sinks.pr_curves(row["step"], self.last_predictions)
        self.sinks.close()
        return row

    # ------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        assert self.env is not None
        return {
            "version": 1,
            "epoch": self.epoch,
            "batches_done": getattr(self, "_batches_done", 0),  # into epoch + 1 (a preemption save)
            # Per rank: the streaming loader's position (rank r's entry is r's own state).
            "data": self._gather_data_state() if getattr(self, "_batches_done", 0) else None,
            "partial_epoch": self._partial_totals if getattr(self, "_batches_done", 0) else None,
            "global_step": int(self.engine.global_steps),
            "train_batch_size": int(self.engine.train_batch_size()),
            "micro_batch_size": int(self.engine.train_micro_batch_size_per_gpu()),
            "grad_accumulation_steps": int(self.engine.gradient_accumulation_steps()),
            "config_hash": checkpoint.config_hash(self.cfg.to_dict()),
            "monitor": self.t.monitor,
            "best_metric": self.best_metric,
            "best_row": self.best_row,
            "epochs_without_improvement": self.epochs_without_improvement,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "world_size": self.env.world_size,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "model_name": getattr(self.model, "model_name", type(self.model).__name__),
            "num_parameters": self._num_parameters(),
            "param_groups": list(self.group_names),  # the optimizer state's layout (see optim.param_groups)
            # The whole run config: export rebuilds the model from its `model` section.
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self, tag: str, update_latest: bool = True) -> Path:
        self._setup()
        self._require_training("save_checkpoint()")
        if self.nonfinite is not None:
            self.nonfinite.check()  # the deferred loss check first: its message names the batch
        self._check_weights_finite(tag)
        tag_dir = checkpoint.save(self.engine, self.t.checkpoint_dir, tag, self._state(), update_latest)
        console().info("Saving checkpoint to: %s", tag_dir)
        return tag_dir

    def resume_from_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, LR scheduler (plateau state too), epoch, step and best metric.

        `path` is a checkpoint directory (its newest complete tag is used), a tag directory, or
        the seed's `.../epoch_N.pth`. `train()` then continues with the next epoch.
        """
        load_dir, tag = checkpoint.resolve(path)
        saved = checkpoint.read_state(load_dir / tag)
        self._check_same_model(load_dir / tag, saved)
        self._plan_resume(load_dir / tag, saved)
        self._setup()
        self._require_training("resume_from_checkpoint()")
        try:
            if self._universal:
                loaded, client = self.engine.load_checkpoint(str(load_dir / tag), tag=checkpoint.UNIVERSAL)
            else:
                loaded, client = self.engine.load_checkpoint(str(load_dir), tag=tag)
        except RuntimeError as exc:  # torch's "size mismatch" / "Missing key(s)" for another architecture
            raise CheckpointError(
                f"{load_dir / tag} does not fit this model ({first_line(exc, 300)}); resume with the model it was trained "
                "with, or start without --load-dir"
            ) from exc
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint at {load_dir}/{tag}")
        state = (client or {}).get("ds_trainer") or saved
        if state.get("config_hash") not in (None, checkpoint.config_hash(self.cfg.to_dict())):
            log.warning("the model/training/deepspeed config differs from the checkpoint's; continuing with this one")
        self.epoch = int(state["epoch"])
        self._skip_batches = int(state.get("batches_done", 0))
        partial = state.get("partial_epoch")
        self._partial_totals = [float(x) for x in partial] if self._skip_batches and partial else None
        data = state.get("data") or []
        assert self.env is not None
        if self._skip_batches and len(data) == self.env.world_size:
            self._data_state = data[self.env.rank]
        if state.get("monitor", self.t.monitor) == self.t.monitor:
            self.best_metric = state.get("best_metric")
            self.best_row = state.get("best_row")
            self.epochs_without_improvement = int(state.get("epochs_without_improvement", 0))
        else:
            log.warning("the checkpoint monitored %s, this run monitors %s: best metric reset", state["monitor"], self.t.monitor)
        if self.plateau is not None:
            if state.get("plateau"):
                self.plateau.load_state_dict(state["plateau"], self.engine.lr_scheduler)
            else:
                log.warning("the checkpoint has no plateau scheduler state; the plateau scheduler starts afresh")
        self.sinks.rewind(self.epoch, int(self.engine.global_steps))
        if self.env.is_main:
            (load_dir / checkpoint.PREEMPTED).unlink(missing_ok=True)  # this is the resume it asked for
        log.info("resumed from %s at epoch %d, global step %d", load_dir / tag, self.epoch, self.engine.global_steps)
        return state

    def _num_parameters(self) -> int:
        # ZeRO-3 leaves each parameter's full size in ds_numel once the engine has partitioned it.
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.model.parameters())

    def _check_same_model(self, tag_dir: Path, saved: dict[str, Any]) -> None:
        """Refuse, before DeepSpeed's shape errors, a checkpoint of another architecture."""
        name = getattr(self.model, "model_name", type(self.model).__name__)
        count = self._num_parameters()
        then_name, then_count = saved.get("model_name"), saved.get("num_parameters")
        if then_count is not None and int(then_count) != count:
            raise CheckpointError(
                f"{tag_dir} holds a model of {int(then_count):,} parameters ({then_name}); this one has {count:,} "
                f"({name}). Resume with the model.* settings it was trained with, or start without --load-dir"
            )
        then_groups = saved.get("param_groups")
        if then_groups is None and saved.get("global_step"):
            # Written before groups were recorded (and merged): its optimizer state has backbone and head
            # apart, so this run keeps them apart too, and the resume fits.
            self._split_groups = True
            log.info("%s predates merged parameter groups: backbone and head stay in separate groups", tag_dir)
        elif then_groups is not None and self.train_loader is not None:
            now_groups = [g["name"] for g in optim.param_groups(self.model, self.t)]
            if list(then_groups) != now_groups:
                raise CheckpointError(
                    f"{tag_dir} holds optimizer state for parameter groups {', '.join(then_groups)}; this run has "
                    f"{', '.join(now_groups)} (training.backbone_lr_scale 1 puts backbone and head in one group, any "
                    "other value splits them). Resume with the backbone_lr_scale it was trained with"
                )

    def _plan_resume(self, tag_dir: Path, saved: dict[str, Any]) -> None:
        """Before the engine exists: adapt to a checkpoint saved on a different world size.

        The global batch stays what it was (the LR schedule and the optimizer's statistics
        depend on it), so gradient accumulation absorbs the change of rank count; ZeRO-sharded
        or bf16 optimizer state goes through DeepSpeed's universal format.
        """
        old_world = int(saved.get("world_size", 0))
        if self.engine is not None:
            assert self.env is not None
            if old_world and old_world != self.env.world_size:
                raise CheckpointError(
                    f"{tag_dir} was saved by {old_world} ranks, this job has {self.env.world_size}: call "
                    "resume_from_checkpoint() before train()/evaluate(), so the engine is built for it"
                )
            return
        self._select_device()
        env = init_distributed(self.cfg.distributed.timeout_s)
        if not old_world or old_world == env.world_size:
            return
        global_batch = int(saved.get("train_batch_size") or 0)
        micro = getattr(self.train_loader, "batch_size", None) or self.t.batch_size
        if global_batch:
            accumulation, rest = divmod(global_batch, micro * env.world_size)
            if rest or accumulation < 1:
                raise ConfigError(
                    f"{tag_dir} trained with a global batch of {global_batch} "
                    f"({saved.get('micro_batch_size')} x {saved.get('grad_accumulation_steps')} accumulation x "
                    f"{old_world} ranks); on {env.world_size} ranks with batch_size {micro} that needs "
                    f"{global_batch / (micro * env.world_size):g} accumulation steps, not a whole number. "
                    f"Choose training.batch_size so that batch_size x {env.world_size} divides {global_batch}"
                )
            log.info(
                "resuming a %d-rank checkpoint on %d ranks: grad_accumulation_steps %d (config: %d) keeps the "
                "global batch %d", old_world, env.world_size, accumulation, self.t.grad_accumulation_steps, global_batch,
            )  # fmt: skip
            self.t.grad_accumulation_steps = accumulation
        if any(tag_dir.glob("*optim_states.pt")):
            checkpoint.to_universal(tag_dir, env.is_main)
            self._universal = True

    def _require_training(self, what: str) -> None:
        if self.trainable and self.train_loader is None:
            raise ConfigError(f"{what}: needs a train_loader (evaluating a checkpoint: ds-trainer eval)")
        if not self.trainable:
            raise ConfigError(
                f"{what}: the model has no trainable parameters (mode zero-shot is evaluation only); "
                "call evaluate(), or train a fine-tune / prompt-tuning / LoRA model"
            )

    # ------------------------------------------------------------------ train
    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        delta = self.t.min_delta
        if self.t.monitor_higher_is_better:
            return value > self.best_metric + delta
        return value < self.best_metric - delta

    def train(self) -> list[dict[str, Any]]:
        """Train from the epoch after the last finished one to `num_epochs`; returns the metric rows."""
        self._setup()
        self._require_training("train()")
        self._acquire_lock()
        try:
            return self._train_epochs()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _acquire_lock(self) -> None:
        """Rank 0 takes checkpoint_dir's lock; every rank learns whether it could (and stops if not)."""
        from ds_trainer.run_lock import DirLock

        assert self.env is not None
        refusal = None
        if self.env.is_main:
            lock = DirLock(self.t.checkpoint_dir)
            try:
                lock.acquire()
                self._lock = lock
            except CheckpointError as exc:
                refusal = str(exc)
        if self.env.world_size > 1:
            refusal = gather_objects([refusal])[0]
        if refusal is not None:
            raise CheckpointError(refusal)

    def _train_epochs(self) -> list[dict[str, Any]]:
        assert self.env is not None
        last = self.t.num_epochs
        monitor = self.t.monitor
        for epoch in range(self.epoch + 1, last + 1):
            row: dict[str, Any] = {"epoch": epoch}
            row.update(self._train_epoch(epoch))
            if self.val_loader is not None:
                row.update(self.evaluate())
            row["step"] = int(self.engine.global_steps)
            row["lr"] = float(self.engine.get_lr()[0])
            self.epoch = epoch
            value = float(row[monitor])
            if math.isnan(value):
                log.warning("epoch %d: %s is NaN (one-class validation set?); counted as no improvement", epoch, monitor)
            improved = self._improved(value)
            if improved:
                self.best_metric, self.epochs_without_improvement = value, 0
                self.best_row = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            else:
                self.epochs_without_improvement += 1
            if self.plateau is not None and self.plateau.step(value, self.engine.lr_scheduler):
                console().info("Plateau: %s did not improve; LR scale now %.3g", monitor, self.plateau.scale)
            row["monitor"] = monitor
            self.sinks.write(row)
            if self.val_loader is not None:
                self.sinks.pr_curves(row["step"], self.last_predictions)
            self.history.append(row)
            stop = self.t.early_stopping and self.epochs_without_improvement >= self.t.patience
            freq = self.t.save_frequency
            if epoch == last or stop or (freq > 0 and epoch % freq == 0):
                self.save_checkpoint(checkpoint.epoch_tag(epoch))
                if self.env.is_main:
                    checkpoint.drop_preemption_tags(self.t.checkpoint_dir, before_step=row["step"])
                    if self.t.keep_last is not None:
                        checkpoint.prune(self.t.checkpoint_dir, self.t.keep_last)
            if improved:
                self.save_checkpoint(checkpoint.BEST, update_latest=False)
            if stop:
                console().info(
                    "Early stopping: %s has not improved for %d epochs (best %.4f)",
                    monitor, self.epochs_without_improvement, self.best_metric,
                )  # fmt: skip
                break
        self._report_best()
        self.sinks.close()
        self.preemption.uninstall()
        return self.history

    def _report_best(self) -> None:
        if self.best_row is None:
            return
        shown = ", ".join(
            f"{k} {self.best_row[k]:.4f}" for k in ("val_auc", "val_acc", "val_loss", "train_loss") if k in self.best_row
        )
        console().info(
            "Best checkpoint: %s (epoch %d, %s %.4f; %s)",
            Path(self.t.checkpoint_dir) / checkpoint.BEST, self.best_row["epoch"], self.t.monitor,
            self.best_metric, shown,
        )  # fmt: skip
