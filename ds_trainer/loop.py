"""One training epoch, and the micro-batch inside it: forward, loss, backward, step.

Everything else around the step (logging, lock refresh, FLOP counting, fault injection, the
preemption poll) is a hook (hooks.py), registered only when enabled. A preemption is an outcome:
`run_epoch` returns where it stopped and the epoch's totals so far; the caller saves and exits.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ds_trainer import batches, loaders
from ds_trainer.engine import RunSettings
from ds_trainer.errors import ConfigError, DataError
from ds_trainer.flops import MfuMeter
from ds_trainer.hooks import Hooks, StepEnd
from ds_trainer.metrics import ai_scores, all_reduce_sum
from ds_trainer.state import EpochTotals

log = logging.getLogger(__name__)


@dataclass
class EpochStart:
    """How an epoch begins: at its first batch, or after the batches a preempted run trained on."""

    skip_batches: int = 0
    data_state: Any = None  # this rank's loader position at the preemption (fast-forward without decoding)
    carried: EpochTotals | None = None  # the interrupted epoch's totals so far, over all ranks


@dataclass
class EpochResult:
    totals: EpochTotals  # over all ranks, the carried part included
    batches_done: int  # batches of this epoch trained so far
    preempted: bool = False
    row: dict[str, Any] | None = None  # the epoch's metrics, when it finished


def auxiliary_loss(model: Any) -> torch.Tensor | None:
    """The model's own loss terms of its last forward (`auxiliary_loss()`, e.g. svd-residual), or None."""
    fn = getattr(model, "auxiliary_loss", None)
    return fn() if callable(fn) else None


class TrainLoop:
    def __init__(
        self,
        engine: Any,
        loader: Iterable,
        *,
        settings: RunSettings,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        dtype: torch.dtype,
        nonfinite: Any,
        hooks: Hooks,
        max_bad_fraction: float,
        show_progress: bool,
        num_epochs: int,
        mfu: MfuMeter | None = None,
    ) -> None:
        self.engine, self.loader, self.settings = engine, loader, settings
        self.loss_fn, self.dtype = loss_fn, dtype
        self.nonfinite, self.hooks = nonfinite, hooks
        self.max_bad_fraction = max_bad_fraction
        self.show_progress, self.num_epochs = show_progress, num_epochs
        self.mfu = mfu
        self.micro_batches = 0  # trained in this process (fault injection counts them)

    def run_epoch(self, epoch: int, start: EpochStart) -> EpochResult:
        engine, loader, device = self.engine, self.loader, self.engine.device
        loaders.set_epoch(loader, epoch)
        engine.train()
        skip, offset = start.skip_batches, 0  # offset: batches before the loop's first (a fast-forwarded resume)
        if skip and start.data_state is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(start.data_state)  # it fast-forwards its streams without decoding
            log.info("epoch %d: continuing after the %d batches trained on before the preemption", epoch, skip)
            skip, offset = 0, skip
        elif skip:
            log.info("epoch %d: skipping the %d batches trained on before the preemption", epoch, skip)
        sums = torch.zeros(2, device=device)  # loss sum, correct: on the device, no sync per step
        seen = bad = nonfinite = 0
        self.data_wait = 0.0
        bar = tqdm(total=len(loader), desc=f"Epoch {epoch}/{self.num_epochs}", disable=not self.show_progress,
                   dynamic_ncols=True, mininterval=1.0)  # fmt: skip
        self.hooks.on_epoch_start(epoch)
        began = time.perf_counter()
        preempted, done = False, offset
        try:
            for i, batch in enumerate(self._timed(loader)):
                done = offset + i + 1
                bar.update(1)
                if i < skip:
                    # The loader is seeded per epoch: the batches after these are the ones the interrupted run saw next.
                    continue
                if batches.size(batch) == 0:
                    # Skipping it on this rank alone would leave the others waiting in the step's collectives.
                    raise DataError(
                        f"epoch {epoch}: a training batch held no usable image ({batches.bad_samples(batch)} bad; the "
                        "warnings above name the files): replace or remove them, or shard the folder with "
                        "ds-trainer shard (it verifies every image)"
                    )
                trained, stepped = self._micro_batch(batch, epoch, sums, bar)
                bad += batches.bad_samples(batch)  # after unpack: data.decode gpu counts the files it could not decode
                if not trained:
                    nonfinite += 1
                    continue
                seen += trained
                if stepped and self.hooks.should_stop():
                    preempted = True
                    break
        finally:
            bar.close()
        # The poll started after the epoch's last step (every rank has one in flight, or none has).
        preempted = preempted or self.hooks.should_stop_at_epoch_end()
        elapsed = time.perf_counter() - began
        if not preempted:
            self.nonfinite.check()
        local = torch.cat([sums, torch.tensor([float(seen), float(bad), self.data_wait], device=device)])
        loss_sum, correct, seen_all, bad_all, wait = (float(x) for x in all_reduce_sum(local).tolist())
        here = EpochTotals(loss_sum, correct, seen_all, bad_all, float(nonfinite))  # non-finite: the same on every rank
        totals = here + (start.carried or EpochTotals())
        if preempted:
            return EpochResult(totals, done, preempted=True)
        row = self._row(totals, seen_all, wait, elapsed)
        self.hooks.on_epoch_end(epoch, row)
        return EpochResult(totals, done, row=row)

    def _micro_batch(self, batch: Any, epoch: int, sums: torch.Tensor, bar: Any) -> tuple[int, bool]:
        """Trains on one micro-batch: (samples trained, 0 if it was skipped; whether an optimizer step ran)."""
        engine = self.engine
        inputs, targets = batches.unpack(batch, engine.device, self.dtype)
        with self.hooks.measure():
            outputs = engine(inputs)
            loss = self.loss_fn(outputs, targets)
            aux = auxiliary_loss(getattr(engine, "module", engine))
            if aux is not None:  # svd-residual's constraint losses, computed inside the forward (ZeRO-3 safe)
                loss = loss + aux.to(loss.dtype)
        self.micro_batches += 1
        loss = self.hooks.on_loss(self.micro_batches, loss)
        step = int(engine.global_steps) + 1
        if not self.nonfinite.admit(loss, self.micro_batches, epoch, step, batches.keys(batch)):
            return 0, False  # on_nonfinite skip: no backward and no step, on every rank
        with self.hooks.measure():
            engine.backward(loss)
        self.hooks.on_backward(targets.shape[0])
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            lrs = engine.get_lr()  # the LR this step applies (the scheduler moves it inside engine.step())
            self.hooks.on_before_step(step)
        engine.step()
        sums[0] += loss.detach().float() * targets.shape[0]
        sums[1] += (ai_scores(outputs) >= 0.5).long().eq(targets).sum()
        if boundary:
            self.hooks.on_step(StepEnd(epoch, int(engine.global_steps), lrs, loss, bar))
        return targets.shape[0], boundary

    def _timed(self, loader: Iterable) -> Iterator[Any]:
        """The loader's batches, adding the time spent waiting for each to `data_wait`."""
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - t0
            yield batch

    def _row(self, totals: EpochTotals, seen_here: float, wait: float, elapsed: float) -> dict[str, Any]:
        """The epoch's metrics; a resumed epoch counts its batches before the preemption too."""
        if totals.seen == 0:
            raise ConfigError("the train loader yielded no batches")
        batches.check_bad_fraction(int(totals.bad), int(totals.seen), "training", self.max_bad_fraction)
        world = self.settings.world_size
        row: dict[str, Any] = {
            "train_bad_samples": int(totals.bad),
            "train_nonfinite_steps": int(totals.nonfinite),
            "train_loss": totals.loss_sum / totals.seen,
            "train_acc": totals.correct / totals.seen,
            # This process's own batches and time only.
            "samples_per_s": seen_here / elapsed if elapsed > 0 and seen_here else math.nan,
            "epoch_time_s": elapsed,
            # Mean over ranks of the time the loop sat in next(loader): > a few % means the loader is the bottleneck.
            "data_wait_s": wait / world,
            "data_wait_fraction": wait / world / elapsed if elapsed > 0 else math.nan,
        }
        if self.mfu is not None and self.mfu.flops_per_sample and seen_here:
            row["mfu"] = self.mfu.mfu(seen_here, elapsed)
            row["train_tflops"] = self.mfu.achieved_tflops(seen_here, elapsed)
        return row
