"""What a NaN/Inf loss does (`training.on_nonfinite`), without a host sync per step where it can.

- `skip`: the batch must be dropped before its backward, on every rank together (ZeRO's backward
  is collective), so each micro-batch's loss is checked at once: a one-element all-reduce and one
  host sync per micro-batch.
- `stop` (the default): the run fails anyway, so the check is deferred. Each micro-batch only
  folds its flag into a device tensor (no sync); `check()` runs at every logging step, at the end of
  the epoch and before a mid-epoch save, and raises naming the first non-finite micro-batch (epoch,
  optimizer step, micro-batch, sample keys). A non-finite loss may have reached a few updates by
  then; nothing is saved after it (the save paths check first, and `_check_weights_finite` refuses
  NaN weights), so the last checkpoint on disk stays the last good one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ds_trainer.errors import TrainingError
from ds_trainer.metrics import gather_objects

log = logging.getLogger(__name__)

_NONE = 2**62  # "no non-finite micro-batch yet" for the running minimum


class NonFiniteGuard:
    def __init__(self, policy: str, max_in_a_row: int, device: torch.device, world_size: int) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be stop or skip, not {policy!r}")
        self.policy = policy
        self.max_in_a_row = max_in_a_row
        self.device = device
        self.world_size = world_size
        self.in_a_row = 0
        self._first_bad = torch.full((), _NONE, dtype=torch.long, device=device)  # stop: lowest bad micro-batch
        self._pending: dict[int, tuple[int, int, list[str]]] = {}  # micro-batch -> (epoch, optimizer step, keys)

    def admit(self, loss: torch.Tensor, micro: int, epoch: int, opt_step: int, keys: Sequence[Any]) -> bool:
        """Called with each micro-batch's loss before its backward: False means skip this batch."""
        bad = ~torch.isfinite(loss.detach())
        if self.policy == "stop":
            self._first_bad = torch.minimum(self._first_bad, torch.where(bad, micro, _NONE))
            self._pending[micro] = (epoch, opt_step, list(keys))
            return True
        flag = bad.float().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bool(flag.item()):
            self.in_a_row = 0
            return True
        where = self._where(micro, epoch, opt_step, keys)
        self.in_a_row += 1
        log.warning("non-finite loss at %s: batch skipped (%d in a row)", where, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingError(
                f"{self.in_a_row} non-finite losses in a row (training.max_nonfinite_steps), the last at {where}. "
                "Training diverged: lower training.learning_rate or resume from an earlier checkpoint"
            )
        return False

    def check(self) -> None:
        """stop: raise if any micro-batch since the last check had a non-finite loss on any rank."""
        if self.policy != "stop" or not self._pending:
            return
        first = self._first_bad.reshape(1).clone()
        if self.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        micro = int(first.item())
        pending, self._pending = self._pending, {}
        if micro == _NONE:
            return
        epoch, opt_step, keys = pending.get(micro, (0, 0, []))
        raise TrainingError(
            f"non-finite loss at {self._where(micro, epoch, opt_step, keys)}. Lower training.learning_rate, check "
            "those images, or set training.on_nonfinite: skip"
        )

    def _where(self, micro: int, epoch: int, opt_step: int, keys: Sequence[Any]) -> str:
        # Every rank calls this together (after the all-reduce), so the sample keys of all ranks can be gathered.
        all_keys = [k for part in gather_objects([list(map(str, keys))]) for k in part]
        shown = ", ".join(all_keys[:6]) + (f" (+{len(all_keys) - 6} more)" if len(all_keys) > 6 else "")
        return f"epoch {epoch}, optimizer step {opt_step}, micro-batch {micro}; samples: {shown or 'unnamed'}"
