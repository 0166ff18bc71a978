"""What runs around the training step besides forward, loss, backward and step, each only when enabled.

A `Hook` overrides the moments it needs; `Hooks` calls, at each moment, only the hooks that override
it, so a run without fault injection or MFU pays nothing for them. Moments, in the order the loop
reaches them: `on_epoch_start`; per micro-batch `measure()` (around forward + loss, and around
backward), `on_loss`, `on_backward`; at an optimizer-step boundary `on_before_step` (the optimizer
step about to run), then `on_step` and `should_stop` after it; `on_epoch_end` with the epoch's row.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ds_trainer import faults
from ds_trainer.engine import RunSettings, grad_norm_before_step
from ds_trainer.flops import FlopTally, MfuMeter
from ds_trainer.sinks.logs import console, duration

log = logging.getLogger(__name__)


@dataclass
class StepEnd:
    """An optimizer step that just ran."""

    epoch: int
    step: int  # engine.global_steps after it
    lrs: list[float]  # the LR of each parameter group this step applied
    loss: torch.Tensor  # the boundary micro-batch's loss, on the device
    bar: Any  # the epoch's progress bar


class Hook:
    def on_epoch_start(self, epoch: int) -> None:
        pass

    def measure(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def on_loss(self, micro_batch: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_backward(self, samples: int) -> None:
        pass

    def on_before_step(self, step: int) -> None:
        pass

    def on_step(self, end: StepEnd) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def should_stop_at_epoch_end(self) -> bool:
        """After the epoch's last batch (trained or not), before its totals: a poll still in flight is read."""
        return False

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        pass


def _overrides(hook: Hook, name: str) -> bool:
    return getattr(type(hook), name) is not getattr(Hook, name)


class Hooks(Hook):
    """Several hooks as one; each moment calls only the hooks that override it."""

    _MOMENTS = ("on_epoch_start", "measure", "on_loss", "on_backward", "on_before_step", "on_step",
                "should_stop", "should_stop_at_epoch_end", "on_epoch_end")  # fmt: skip

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self.hooks = list(hooks)
        self._at = {m: [h for h in self.hooks if _overrides(h, m)] for m in self._MOMENTS}

    def on_epoch_start(self, epoch: int) -> None:
        for h in self._at["on_epoch_start"]:
            h.on_epoch_start(epoch)

    @contextlib.contextmanager
    def _all_measure(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for h in self._at["measure"]:
                stack.enter_context(h.measure())
            yield

    def measure(self) -> contextlib.AbstractContextManager[None]:
        return self._all_measure() if self._at["measure"] else contextlib.nullcontext()

    def on_loss(self, micro_batch: int, loss: torch.Tensor) -> torch.Tensor:
        for h in self._at["on_loss"]:
            loss = h.on_loss(micro_batch, loss)
        return loss

    def on_backward(self, samples: int) -> None:
        for h in self._at["on_backward"]:
            h.on_backward(samples)

    def on_before_step(self, step: int) -> None:
        for h in self._at["on_before_step"]:
            h.on_before_step(step)

    def on_step(self, end: StepEnd) -> None:
        for h in self._at["on_step"]:
            h.on_step(end)

    def should_stop(self) -> bool:
        # Every hook is asked (a poll may be a collective every rank must join), not just up to the first yes.
        answers = [h.should_stop() for h in self._at["should_stop"]]
        return any(answers)

    def should_stop_at_epoch_end(self) -> bool:
        answers = [h.should_stop_at_epoch_end() for h in self._at["should_stop_at_epoch_end"]]
        return any(answers)

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        for h in self._at["on_epoch_end"]:
            h.on_epoch_end(epoch, row)


class StepLogger(Hook):
    """Every optimizer step: the LR applied; every `every` steps: loss, grad norm, samples/s, MFU.

    The only host syncs of a step happen here, on logging steps: the loss, the norm, and the
    deferred non-finite check (which must raise before a non-finite loss is logged as a number).
    """

    def __init__(self, engine: Any, model: torch.nn.Module, sinks: Any, settings: RunSettings, every: int,
                 group_names: Sequence[str], nonfinite: Any, mfu: MfuMeter | None) -> None:  # fmt: skip
        self.engine, self.model, self.sinks, self.settings = engine, model, sinks, settings
        self.every = every
        self.group_names = list(group_names)
        self.nonfinite = nonfinite
        self.mfu = mfu
        self._norm: torch.Tensor | None = None
        self._mark = (time.perf_counter(), 0)  # (perf_counter, global step) of the last rate reading

    def on_epoch_start(self, epoch: int) -> None:
        self._mark = (time.perf_counter(), int(self.engine.global_steps))

    def on_before_step(self, step: int) -> None:
        self._norm = (
            grad_norm_before_step(self.engine, self.model, self.settings.zero_stage) if step % self.every == 0 else None
        )

    def on_step(self, end: StepEnd) -> None:
        scalars: dict[str, float] = {"train/lr": float(end.lrs[0])}
        backbone = [lr for name, lr in zip(self.group_names, end.lrs) if name.startswith("backbone")]
        if backbone and len(backbone) < len(end.lrs):
            scalars["train/lr_backbone"] = float(backbone[0])
        if end.step % self.every == 0:
            self.nonfinite.check()
            scalars["train/loss"] = float(end.loss.item())
            norm = self._norm if self._norm is not None else self.engine.get_global_grad_norm()
            if norm is not None:
                scalars["train/grad_norm"] = float(norm)
            end.bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{end.lrs[0]:.2e}")
            scalars.update(self._rates(end.step))
        self.sinks.step(end.step, scalars)

    def _rates(self, step: int) -> dict[str, float]:
        """samples/s (all ranks) and MFU since the last reading: wall time, so data waits count."""
        now = time.perf_counter()
        (then, then_step), self._mark = self._mark, (now, step)
        samples = (step - then_step) * self.settings.samples_per_step
        if samples <= 0 or now <= then:
            return {}
        rates = {"train/samples_per_s": samples / (now - then)}
        mfu = self.mfu.mfu(samples, now - then) if self.mfu is not None else None
        if mfu is not None:
            rates["train/mfu"] = mfu
        return rates


class ProgressLines(Hook):
    """The progress bar's stand-in without a terminal (Slurm logs, nohup): a plain line, rank 0 only.

    A line comes at a log step (every `log_every_n_steps` optimizer steps) once `MIN_INTERVAL_S`
    have passed since the last line, and at any optimizer step once `MAX_INTERVAL_S` have: a fast
    run does not flood its log, a slow one still shows it is alive. Only a step that prints reads
    the loss from the device, and nothing here is a collective (other ranks do not run it).
    """

    MIN_INTERVAL_S = 10.0
    MAX_INTERVAL_S = 60.0

    def __init__(self, settings: RunSettings, num_epochs: int, every: int,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.console = console()
        self.per_epoch = max(1, settings.steps_per_epoch // max(1, settings.grad_accumulation_steps))
        self.num_epochs, self.every, self.clock = num_epochs, every, clock
        self.samples_per_step = settings.samples_per_step
        self._began = self._last = clock()
        self._epoch_began, self._first_step = self._began, None  # this process's first step of the epoch, less one

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch_began, self._first_step = self.clock(), None

    def on_step(self, end: StepEnd) -> None:
        now = self.clock()
        if self._first_step is None:
            self._first_step = end.step - 1
        quiet = now - self._last
        if quiet < self.MAX_INTERVAL_S and (end.step % self.every or quiet < self.MIN_INTERVAL_S):
            return
        self._last = now
        epoch_end = end.epoch * self.per_epoch
        in_epoch = self.per_epoch - max(0, epoch_end - end.step)
        steps, spent = end.step - self._first_step, now - self._epoch_began
        line = (
            f"Epoch {end.epoch}/{self.num_epochs}, step {end.step}/{self.per_epoch * self.num_epochs} "
            f"({in_epoch}/{self.per_epoch} this epoch), loss {float(end.loss.item()):.3f}, lr {end.lrs[0]:.2e}"
        )
        if steps > 0 and spent > 0:
            eta = max(0, epoch_end - end.step) * spent / steps
            line += f", {steps * self.samples_per_step / spent:.1f} samples/s, epoch ends in {duration(eta)}"
        self.console.info("%s, %s elapsed", line, duration(now - self._began))

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        self._last = self.clock()  # the epoch's own line was just printed


class FlopCounter(Hook):
    """Counts the FLOPs of the first micro-batch's forward and backward, for MFU."""

    def __init__(self, mfu: MfuMeter) -> None:
        self.mfu = mfu
        self._tally: FlopTally | None = FlopTally() if mfu.flops_per_sample is None else None

    def measure(self) -> contextlib.AbstractContextManager[None]:
        return self._tally.count() if self._tally is not None else contextlib.nullcontext()

    def on_backward(self, samples: int) -> None:
        if self._tally is None:
            return
        self.mfu.flops_per_sample, self._tally = self._tally.total / samples, None
        log.info("mfu: %.3g GFLOP per sample (forward + backward, counted)", self.mfu.flops_per_sample / 1e9)


class LockRefresh(Hook):
    """Keeps the run's locks (checkpoint_dir, run_dir) fresh, so another host never takes over a live run."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def on_step(self, end: StepEnd) -> None:
        self.lock.refresh()


class FaultInjection(Hook):
    """DS_TRAINER_FAULT's NaN losses and kills (see faults.py); registered only when it is set."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_loss(self, micro_batch: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if faults.nan_loss(micro_batch, self.rank) else loss

    def on_step(self, end: StepEnd) -> None:
        faults.after_step(end.step, self.rank)


class PreemptionPoll(Hook):
    """After each optimizer step, every rank learns whether any rank received SIGTERM/SIGUSR1 (one step
    late: the poll's all-reduce overlaps the next step); at the epoch's end, the last poll is read."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard

    def should_stop(self) -> bool:
        return bool(self.guard.should_stop())

    def should_stop_at_epoch_end(self) -> bool:
        return bool(self.guard.settle())


def for_training(engine: Any, model: torch.nn.Module, sinks: Any, settings: RunSettings, log_every: int,
                 group_names: Sequence[str], nonfinite: Any, mfu: MfuMeter | None, lock: Any, rank: int,
                 preemption: Any, extra: Sequence[Hook] = (), *, progress_lines: bool = False,
                 num_epochs: int = 1) -> Hooks:  # fmt: skip
    """What runs around a training run's steps: each hook only where it has work to do; the poll last.

    `progress_lines`: rank 0 without a terminal (sinks.progress_mode), where no bar is drawn.
    """
    hooks: list[Hook] = [StepLogger(engine, model, sinks, settings, log_every, group_names, nonfinite, mfu)]
    if progress_lines:
        hooks.append(ProgressLines(settings, num_epochs, log_every))
    if mfu is not None and mfu.flops_per_sample is None:
        hooks.append(FlopCounter(mfu))
    if lock is not None:
        hooks.append(LockRefresh(lock))
    if faults.enabled():
        hooks.append(FaultInjection(rank))
    return Hooks([*hooks, *extra, PreemptionPoll(preemption)])
