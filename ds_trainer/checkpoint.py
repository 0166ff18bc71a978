"""Saving, verifying and finding DeepSpeed checkpoints; converting them for another world size.

Layout: `checkpoint_dir/<tag>/` as written by `engine.save_checkpoint` on every rank, plus
`<tag>/ds_trainer.json` written by rank 0 once every rank has finished: the manifest (epoch,
step, world size, config hash, every file with its size and sha256, sealed with its own digest: see
integrity.py) and the completeness marker. Then
`checkpoint_dir/latest` names the newest complete tag. DeepSpeed writes its own `latest` before
the other ranks' ZeRO files are known to be on disk, so we write it ourselves, after the
barrier, atomically. A tag whose manifest is missing, or whose files do not match it, is skipped
on resume with a warning. A tag is a plain name inside its directory (tags.py). `best` is hard links
to the improving epoch's files (`link_best`), so an improving epoch is written once.

Resuming on a different world size goes through DeepSpeed's universal checkpoint format:
`<tag>/universal/` is converted once (by rank 0, with `ds_to_universal`), cached with its own
marker, and loaded with `checkpoint.load_universal`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ds_trainer import integrity, tags
from ds_trainer.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = integrity.MARKER
LATEST = tags.LATEST
BEST = "best"
UNIVERSAL = "universal"
# ds_to_universal refuses a checkpoint without this client-state key; its content only matters
# for tensor/pipeline-parallel layouts, which this trainer does not use.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
_EPOCH_TAG = re.compile(r"^epoch_(\d+)$")
_STEP_TAG = re.compile(r"^step_(\d+)$")


PARTIAL = ".partial"
OLD = ".old"


def save(engine: Any, checkpoint_dir: str | Path, tag: str, state: dict[str, Any], update_latest: bool = True) -> Path:
    """Collective: every rank must call it. Returns the tag directory.

    DeepSpeed writes into `<tag>.partial`; once every rank is done, rank 0 moves it to `<tag>`
    (an existing `<tag>`, e.g. `best`, is set aside as `<tag>.old` until then), writes the marker,
    and only then points `latest` at it. A crash at any point leaves the previous checkpoint
    complete and findable. A full disk raises CheckpointError with the space a checkpoint takes.
    """
    from ds_trainer import faults

    checkpoint_dir = Path(checkpoint_dir)
    tag_dir, partial, old = checkpoint_dir / tag, checkpoint_dir / (tag + PARTIAL), checkpoint_dir / (tag + OLD)
    rank = engine.global_rank
    if rank == 0 and partial.exists():
        shutil.rmtree(partial)  # left by a save that died
    if dist.is_initialized():
        dist.barrier()
    # The metadata goes into the marker alone (resume.read is its one reader); DeepSpeed's client state
    # only carries what ds_to_universal requires.
    client_state = dict(UNIVERSAL_INFO)
    try:
        with faults.saving(tag):
            engine.save_checkpoint(str(checkpoint_dir), tag=partial.name, client_state=client_state, save_latest=False)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(_no_space_message(checkpoint_dir, tag)) from exc
    # save_checkpoint ends with a barrier, so every rank's files are written by now.
    digests = integrity.digests(partial, sorted(_file_sizes(partial)))
    faults.before_marker(tag, rank)
    if rank == 0:
        if tag_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            tag_dir.rename(old)
        partial.rename(tag_dir)
        manifest = dict(state, files=_file_sizes(tag_dir), **{integrity.DIGESTS: digests})
        _atomic_write(tag_dir / MARKER, integrity.seal(manifest))
        if old.exists():
            shutil.rmtree(old)
        if update_latest:
            _atomic_write(checkpoint_dir / LATEST, tag)
    if dist.is_initialized():
        dist.barrier()
    return tag_dir


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _no_space_message(checkpoint_dir: Path, tag: str) -> str:
    sizes = [sum(read_marker(d).get("files", {}).values()) for d in checkpoint_dir.iterdir()
             if d.is_dir() and (d / MARKER).is_file() and is_complete(d)]  # fmt: skip
    need = (
        f"about {_human(max(sizes))} (the size of the last checkpoints)"
        if sizes
        else "the model's and optimizer's state"
    )
    free = _human(shutil.disk_usage(checkpoint_dir).free)
    latest = tags.latest_text(checkpoint_dir)
    kept = f"; {latest} is intact" if latest else ""
    return (
        f"no space left on the device of {checkpoint_dir} while saving {tag}: a checkpoint needs {need}, {free} is "
        f"free{kept}. Free space (training.keep_last prunes old epochs) or set training.checkpoint_dir elsewhere"
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and UNIVERSAL not in p.relative_to(tag_dir).parts
    }


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of what shapes the model and the optimisation (paths and logging excluded)."""
    relevant = {k: config.get(k) for k in ("model", "training", "deepspeed")}
    relevant["training"] = {k: v for k, v in (relevant["training"] or {}).items() if k != "checkpoint_dir"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def problems(tag_dir: Path) -> list[str]:
    """Why `tag_dir` is not a complete checkpoint (empty: it is)."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return [f"no {MARKER} (the save did not finish on every rank)"]
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"unreadable {MARKER}: {exc}"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files") or {}, dict):
        return [f"{MARKER} is not a ds_trainer checkpoint record"]
    out = []
    for name, size in (manifest.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            out.append(f"missing {name}")
        elif path.stat().st_size != size:
            out.append(f"{name} is {path.stat().st_size} bytes, the manifest says {size}")
    return out


def is_complete(tag_dir: Path) -> bool:
    return not problems(tag_dir)


def read_marker(tag_dir: Path) -> Any:
    """The marker's JSON as written (its schema is resume.py's: resume.read interprets it)."""
    return json.loads((tag_dir / MARKER).read_text())


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoint_dir, tag) for a checkpoint directory, a tag directory, or the seed's `epoch_N.pth`.

    A checkpoint directory resolves to the tag `latest` names when that one is complete, else to
    the newest complete tag (by global step). A `latest` that names a path, or a tag directory that links
    outside, is refused before anything it names is opened.
    """
    p = Path(path).expanduser()
    if not p.exists() and p.suffix == ".pth" and p.with_suffix("").is_dir():
        p = p.with_suffix("")  # the seed writes results/saved_models/epoch_5.pth
    if not p.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file; give the checkpoint directory (or one of its tags)")
    if (p / MARKER).is_file():
        integrity.read_sealed(p / MARKER)
        bad = problems(p)
        if bad:
            raise CheckpointError(f"checkpoint {p} is damaged: {'; '.join(bad[:5])}")
        return p.parent, p.name
    tag = tags.read_latest(p)
    if tag is not None:
        if (p / tag / MARKER).is_file():
            integrity.read_sealed(p / tag / MARKER)  # damaged, not incomplete: refused, never passed over
        bad = problems(p / tag)
        if not bad:
            return p, tag
        log.warning(
            "checkpoint %s: 'latest' names %s, which is incomplete (%s); looking for an older one",
            p,
            tag,
            "; ".join(bad[:3]),
        )
    complete = [d for d in p.iterdir()
                if tags.stays_inside(p, d) and d.is_dir() and (d / MARKER).is_file() and is_complete(d)]  # fmt: skip
    if not complete:
        found = ", ".join(sorted(d.name for d in p.iterdir())[:10]) or "nothing"
        damaged = sorted(d for d in p.iterdir() if tags.stays_inside(p, d) and d.is_dir() and (d / MARKER).is_file())[
            :2
        ]
        why = "".join(f"; {d.name}: {b[0]}" for d in damaged if (b := problems(d)))
        raise CheckpointError(
            f"no complete checkpoint in {p} (found: {found}{why}); "
            "a checkpoint is complete once ds_trainer.json is written next to DeepSpeed's files"
        )
    newest = max(complete, key=lambda d: (_global_step(d), d.stat().st_mtime))
    return p, newest.name


def _global_step(tag_dir: Path) -> int:
    step = read_marker(tag_dir).get("global_step")
    return step if type(step) is int else -1  # a record resume.read will refuse by name, if it is picked


PREEMPTED = "PREEMPTED"


def mark_preempted(checkpoint_dir: str | Path, tag: str, step: int) -> None:
    """Rank 0, after a preemption checkpoint: tells scripts/slurm/train.sbatch to requeue the job.

    The exit code alone cannot: srun reports 143 for a task it ended because another one exited first.
    """
    info = {"tag": tag, "global_step": step, "job_id": os.environ.get("SLURM_JOB_ID")}
    _atomic_write(Path(checkpoint_dir) / PREEMPTED, json.dumps(info) + "\n")


def epoch_tag(epoch: int) -> str:
    return f"epoch_{epoch}"


def step_tag(step: int) -> str:
    """A mid-epoch checkpoint, written when the job is preempted."""
    return f"step_{step}"


def drop_preemption_tags(checkpoint_dir: str | Path, before_step: int) -> list[Path]:
    """Delete `step_N` tags older than `before_step` (rank 0): an epoch checkpoint supersedes them."""
    checkpoint_dir = Path(checkpoint_dir)
    latest = tags.latest_text(checkpoint_dir)
    doomed = [
        d for d in checkpoint_dir.iterdir()
        if d.is_dir() and (m := _STEP_TAG.match(d.name)) and int(m.group(1)) < before_step and d.name != latest
    ]  # fmt: skip
    for d in doomed:
        (d / MARKER).unlink(missing_ok=True)
        shutil.rmtree(d)
        log.info("deleted preemption checkpoint %s (superseded)", d)
    return doomed


def prune(checkpoint_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete epoch checkpoints (rank 0, after a save).

    Never touches `best`, the tag `latest` names, incomplete tags, or anything not named epoch_N.
    Returns the deleted tag directories.
    """
    checkpoint_dir = Path(checkpoint_dir)
    latest = tags.latest_text(checkpoint_dir)
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


def link_best(checkpoint_dir: str | Path, tag: str, rank: int) -> Path:
    """Collective: `best` becomes hard links to the complete tag `tag`'s files, written once, not saved again.

    A link shares the epoch's bytes: pruning `tag` later (keep_last) removes a name, not the data
    `best` still uses. Built in `best.partial` and swapped in like a save, so a crash leaves the
    previous `best` whole. The marker is copied, not linked (4 KB, and one tag's marker is never
    another's). Where the filesystem has no hard links, the files are copied, with a warning.
    """
    checkpoint_dir = Path(checkpoint_dir)
    src, best = checkpoint_dir / tag, checkpoint_dir / BEST
    partial, old = checkpoint_dir / (BEST + PARTIAL), checkpoint_dir / (BEST + OLD)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            _link_tree(src, partial)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if exc.errno != errno.ENOSPC:
                raise
            raise CheckpointError(_no_space_message(checkpoint_dir, BEST)) from exc
        if best.exists():
            if old.exists():
                shutil.rmtree(old)
            best.rename(old)
        partial.rename(best)
        shutil.rmtree(old, ignore_errors=True)
        log.info("best is now %s (its files linked, not saved again)", tag)
    if dist.is_initialized():
        dist.barrier()
    return best


_NO_LINKS = (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


def _link_tree(src: Path, dst: Path) -> None:
    copied = False
    for name in _file_sizes(src):
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not copied:
            try:
                os.link(src / name, target)
                continue
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                log.warning("%s: no hard links on this filesystem (%s); best is a full copy", dst.parent, exc.strerror)
                copied = True
        shutil.copyfile(src / name, target)
    shutil.copyfile(src / MARKER, dst / MARKER)


def to_universal(tag_dir: Path, is_main: bool) -> Path:
    """`<tag>/universal`, converted by rank 0 on first use (collective: every rank calls it).

    Its marker records the converted files' digests (resume verifies them before loading); a cache
    from before digests is converted again.
    """
    out = tag_dir / UNIVERSAL
    if is_main and not _has_digests(out):
        shutil.rmtree(out, ignore_errors=True)  # a conversion cut short
        log.info("converting %s to DeepSpeed's universal format (once; cached in %s)", tag_dir, out)
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        args = argparse.Namespace(
            input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=2, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=False,
        )  # fmt: skip
        chatter = io.StringIO()
        start = time.perf_counter()
        try:
            # It prints every step and parameter, and draws unlabelled tqdm bars on stderr: the
            # line above says what runs, the one below that it is done; the rest goes to the log.
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                ds_to_universal(args)
        except Exception as exc:
            log.debug("ds_to_universal output:\n%s", chatter.getvalue())
            raise CheckpointError(
                f"could not convert {tag_dir} to the universal format for a different world size: {exc}"
            ) from exc
        log.debug("ds_to_universal output:\n%s", chatter.getvalue())
        files = _file_sizes(out)
        converted = {
            **read_marker(tag_dir),
            "files": files,
            integrity.DIGESTS: integrity.digests(out, sorted(files), collective=False),
        }
        _atomic_write(out / MARKER, integrity.seal(converted))
        log.info("converted %s to the universal format in %.0f s", tag_dir.name, time.perf_counter() - start)
    if dist.is_initialized():
        dist.barrier()
    if not (out / MARKER).is_file():
        raise CheckpointError(f"{out} was not written; is {tag_dir.parent} on a filesystem every rank sees?")
    return out


def _has_digests(tag_dir: Path) -> bool:
    try:
        return integrity.DIGESTS in read_marker(tag_dir)
    except (OSError, ValueError):
        return False


def after_epoch_save(checkpoint_dir: str | Path, saved: str, improved: bool, step: int, keep_last: int | None,
                     rank: int, is_main: bool) -> None:  # fmt: skip
    """After epoch tag `saved` is written: `best` linked to its files when the epoch improved (written
    once, not twice), then (rank 0) older preemption tags and, with `keep_last`, older epochs
    dropped; pruning comes after the link, so it never takes what `best` uses."""
    if improved:
        link_best(checkpoint_dir, saved, rank)
    if is_main:
        drop_preemption_tags(checkpoint_dir, before_step=step)
        if keep_last is not None:
            prune(checkpoint_dir, keep_last)
