"""Saving and finding DeepSpeed checkpoints.

Layout: `checkpoint_dir/<tag>/` as written by `engine.save_checkpoint` on every rank, plus
`<tag>/ds_trainer.json` written by rank 0 once every rank has finished (the completeness
marker), and `checkpoint_dir/latest` naming the newest complete tag. DeepSpeed writes its own
`latest` before the other ranks' ZeRO files are known to be on disk, so we write it ourselves,
after the barrier, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ds_trainer.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = "ds_trainer.json"
LATEST = "latest"
BEST = "best"
_EPOCH_TAG = re.compile(r"^epoch_(\d+)$")


def save(engine: Any, checkpoint_dir: str | Path, tag: str, state: dict[str, Any], update_latest: bool = True) -> Path:
    """Collective: every rank must call it. Returns the tag directory."""
    checkpoint_dir = Path(checkpoint_dir)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"ds_trainer": state}, save_latest=False)
    # save_checkpoint ends with a barrier, so every rank's files are written by now.
    tag_dir = checkpoint_dir / tag
    if engine.global_rank == 0:
        _atomic_write(tag_dir / MARKER, json.dumps(state, indent=2, sort_keys=True))
        if update_latest:
            _atomic_write(checkpoint_dir / LATEST, tag)
    if dist.is_initialized():
        dist.barrier()
    return tag_dir


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def read_state(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / MARKER).read_text())


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoint_dir, tag) for a checkpoint directory, a tag directory, or the seed's `epoch_N.pth`.

    A checkpoint directory resolves to the tag `latest` names when that one is complete, else to
    the newest complete tag (by global step).
    """
    p = Path(path).expanduser()
    if not p.exists() and p.suffix == ".pth" and p.with_suffix("").is_dir():
        p = p.with_suffix("")  # the seed writes results/saved_models/epoch_5.pth
    if not p.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file; give the checkpoint directory (or one of its tags)")
    if is_complete(p):
        return p.parent, p.name
    latest = p / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(p / tag):
            return p, tag
        log.warning("checkpoint %s: 'latest' names %s, which is incomplete; looking for an older one", p, tag)
    complete = [d for d in p.iterdir() if d.is_dir() and is_complete(d)]
    if not complete:
        found = ", ".join(sorted(d.name for d in p.iterdir())[:10]) or "nothing"
        raise CheckpointError(
            f"no complete checkpoint in {p} (found: {found}); "
            "a checkpoint is complete once ds_trainer.json is written next to DeepSpeed's files"
        )
    newest = max(complete, key=lambda d: (read_state(d).get("global_step", -1), d.stat().st_mtime))
    return p, newest.name


def epoch_tag(epoch: int) -> str:
    return f"epoch_{epoch}"


def prune(checkpoint_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete epoch checkpoints (rank 0, after a save).

    Never touches `best`, the tag `latest` names, incomplete tags, or anything not named epoch_N.
    Returns the deleted tag directories.
    """
    checkpoint_dir = Path(checkpoint_dir)
    latest_file = checkpoint_dir / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    epochs = sorted(
        (int(m.group(1)), d)
        for d in checkpoint_dir.iterdir()
        if d.is_dir() and (m := _EPOCH_TAG.match(d.name)) and is_complete(d)
    )
    doomed = [d for _, d in epochs[: max(0, len(epochs) - keep_last)] if d.name != latest]
    for d in doomed:
        # Drop the marker first: a deletion cut short leaves an incomplete tag, never a broken "complete" one.
        (d / MARKER).unlink(missing_ok=True)
        shutil.rmtree(d)
        log.info("keep_last=%d: deleted checkpoint %s", keep_last, d)
    return doomed
