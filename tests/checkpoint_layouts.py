"""Checkpoint metadata as earlier ds_trainer versions wrote it, pinned here (resume.read upgrades it).

Version 1 is the layout of every checkpoint written before the Trainer's component split: the same
keys as today's, the interrupted epoch's totals as a positional list (loss sum, correct, seen, bad,
non-finite), and, before parameter groups were merged, no `param_groups` at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

V1_KEYS = (
    "version", "epoch", "batches_done", "data", "partial_epoch", "global_step", "train_batch_size",
    "micro_batch_size", "grad_accumulation_steps", "config_hash", "monitor", "best_metric", "best_row",
    "epochs_without_improvement", "plateau", "world_size", "zero_stage", "model_name", "num_parameters",
    "param_groups", "config", "files",
)  # fmt: skip
V1_TOTALS = ("loss_sum", "correct", "seen", "bad", "nonfinite")


def rewrite_as_v1(tag_dir: Path, *, merged_groups: bool = True, training: dict[str, Any] | None = None) -> dict:
    """Turn `tag_dir`'s marker into the version-1 layout; `merged_groups=False`: from before the merge.

    `training` overrides keys of the recorded run config's training section (what that run was given).
    Returns the record written.
    """
    marker = tag_dir / "ds_trainer.json"
    state = json.loads(marker.read_text())
    assert state["version"] == 3, state.get("version")  # the layout this helper starts from
    old = {k: state[k] for k in V1_KEYS if k in state}
    old["version"] = 1
    if isinstance(old.get("partial_epoch"), dict):
        old["partial_epoch"] = [old["partial_epoch"][k] for k in V1_TOTALS]
    if not merged_groups:
        del old["param_groups"]
    if training:
        old["config"]["training"].update(training)
    marker.write_text(json.dumps(old, indent=2, sort_keys=True))
    return old
