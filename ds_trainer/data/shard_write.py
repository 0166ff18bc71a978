"""Writing planned shards: decode every image, write the tar and its sidecar, one shard per task.

Every image is fully decoded before it goes into a shard (a file that does not decode is
skipped and listed), because the manifest's counts are what the loader trusts. Each finished
shard gets a sidecar JSON naming the plan it was written from; a re-run keeps every shard whose
sidecar matches its plan, so an interrupted run resumes instead of starting over.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple

import webdataset as wds
from PIL import ImageFile, UnidentifiedImageError
from tqdm import tqdm

from ds_trainer.child_processes import die_with_parent, sigterm_raises, terminate_workers
from ds_trainer.data.image_limits import open_checked
from ds_trainer.data.manifest import atomic_write_json
from ds_trainer.data.regular_file import NotRegularFile, read_regular
from ds_trainer.data.scan import EXT_KEY, LABEL_NAMES, OUTSIDE_SRC_REASON, is_inside
from ds_trainer.data.shard_plan import SIDECAR_FORMAT, SIDECAR_VERSION, PlannedSample, ShardJob
from ds_trainer.errors import DataError

# ---------------------------------------------------------------- writing one shard (runs in a pool worker)


class _Unreadable(Exception):
    """An image that is not read or does not fully decode; carries the kind and reason recorded in the manifest."""

    def __init__(self, reason: str, kind: str = "unreadable") -> None:
        super().__init__(reason)
        self.kind = kind


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image (unknown format or broken header)"
    # PIL puts object reprs (with memory addresses) into some messages; keep reasons reproducible
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def verify_image(data: bytes, decode: bool = True) -> dict[str, Any]:
    """Decode every pixel (load(), since verify() passes truncated and corrupt image data).

    Returns width/height/mode/format; an image the loader would refuse (image_limits) or any decoding
    problem raises _Unreadable, so the manifest counts only samples the loader can use. Truncated files
    must fail here even if some caller set ImageFile.LOAD_TRUNCATED_IMAGES, so it is forced off.
    decode=False reads the header only (shard_genimage(verify=False)).
    """
    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with open_checked(io.BytesIO(data)) as img:  # the loader's bound on one image, from the header
            if decode:
                img.load()
            return {"width": img.width, "height": img.height, "mode": img.mode, "format": img.format}
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, zlib.error ...)
        raise _Unreadable(_reason(exc)) from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def _read_verified(
    sample: PlannedSample, decode: bool = True, confine: str | None = None
) -> tuple[bytes, dict[str, Any]]:
    path = sample.path
    if confine is not None:
        # checked again here, not only in the scan: the tree may have changed since (a file replaced
        # by a link leading outside), and the resolved path is what is read
        path = os.path.realpath(path)
        if not is_inside(path, confine):
            raise _Unreadable(OUTSIDE_SRC_REASON, "symlink_outside_src")
    try:
        data = read_regular(path)  # a FIFO or device named x.png would block or never end
    except NotRegularFile as exc:
        raise _Unreadable(f"{exc.kind}, not a regular file; not read") from exc
    except OSError as exc:
        raise _Unreadable(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise _Unreadable("empty file (0 bytes)")
    return data, verify_image(data, decode)


class TarEntry(NamedTuple):
    """One sample as it goes into a shard: its tar members, its label (None: not known) and image mode."""

    members: dict[str, Any]  # __key__ and the member extensions -> bytes
    label: int | None
    mode: str


def _verified_entries(job: ShardJob) -> Iterator[TarEntry | dict[str, str]]:
    """The planned samples read and decoded; a skipped one as its manifest record (path, kind, reason)."""
    for sample in job.samples:
        try:
            data, info = _read_verified(sample, job.verify, job.confine)
        except _Unreadable as exc:
            yield {"path": sample.rel, "kind": exc.kind, "reason": str(exc)}
            continue
        yield TarEntry(tar_sample(job, sample, data, info), sample.label, info["mode"])


def _write_one_shard(job: ShardJob) -> dict[str, Any]:
    """Verify and write one planned shard; returns its sidecar (also written next to the tar).

    Image bytes are stored unchanged: re-encoding would alter the artifacts a detector looks for.
    """
    return write_shard(job, _verified_entries(job))


def write_shard(
    job: Any, entries: Iterable[TarEntry | dict[str, str]], counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """Write the tar of `job` (out, rel, sidecar_rel, digest, generator, split) from `entries`, then its sidecar.

    The tar is written under a .tmp name and renamed when complete, then the sidecar is written:
    a tar without a matching sidecar is treated as unfinished and rewritten on the next run.
    An entry that is a dict is a skipped file, listed in the sidecar. `counts` (count, ai, nature)
    replaces what the sidecar would count from the entries (a derived set keeps its source's counts).
    """
    out = Path(job.out)
    final, tmp = out / job.rel, out / (job.rel + ".tmp")
    keys: list[str] = []
    skipped: list[dict[str, str]] = []
    modes: dict[str, Counter[str]] = {"ai": Counter(), "nature": Counter()}
    ai = 0
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # fixed mtime: the same tree and seed give byte-identical shards
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:
            for entry in entries:
                if isinstance(entry, dict):
                    skipped.append(entry)
                    continue
                writer.write(entry.members)
                keys.append(entry.members["__key__"])
                if entry.label is not None:
                    ai += entry.label
                    modes[LABEL_NAMES[entry.label]][entry.mode] += 1
        if keys:
            os.replace(tmp, final)
        else:  # every image unreadable: no empty tar, the sidecar alone records the outcome
            tmp.unlink()
            final.unlink(missing_ok=True)
        sidecar = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "plan": job.digest,
            "path": job.rel,
            "generator": job.generator,
            "split": job.split,
            "count": len(keys),
            "ai": ai,
            "nature": len(keys) - ai,
            **(counts or {}),
            "bytes": final.stat().st_size if keys else 0,
            "modes": {name: dict(sorted(c.items())) for name, c in modes.items()},
            "skipped": skipped,
            "keys": keys,
        }
        atomic_write_json(out / job.sidecar_rel, sidecar)
    except OSError as exc:
        raise DataError(
            f"writing shard {final} failed ({exc}); check free space and permissions in {out} and "
            "re-run the same command: finished shards are kept"
        ) from exc
    return sidecar


def tar_sample(job: ShardJob, sample: PlannedSample, data: bytes, info: dict[str, Any]) -> dict[str, Any]:
    ext = Path(sample.rel).suffix.lower().lstrip(".")
    meta = {
        "generator": job.generator,
        "split": job.split,
        "label": sample.label,
        "path": sample.rel,
        **info,  # width, height, mode (before any RGB conversion), format (as decoded)
    }
    return {
        "__key__": sample.key,
        EXT_KEY.get(ext, ext): data,
        "cls": str(sample.label).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }


# ---------------------------------------------------------------- resuming and running the plan


def reusable_sidecar(job: ShardJob) -> dict[str, Any] | None:
    """The sidecar of a finished shard written from exactly this plan, else None (rewrite it)."""
    out = Path(job.out)
    try:
        sidecar = json.loads((out / job.sidecar_rel).read_text())
        current = (
            sidecar.get("format") == SIDECAR_FORMAT
            and sidecar.get("version") == SIDECAR_VERSION
            and sidecar.get("plan") == job.digest
        )
        if current and sidecar["count"] > 0:
            current = (out / job.rel).stat().st_size == sidecar["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sidecar if current else None


def clean_stale(out: Path, dirs: set[tuple[str, str]], jobs: list[ShardJob]) -> None:
    """Remove temp files and shards that are not in the plan, so nothing unlisted lingers."""
    planned = {j.rel for j in jobs} | {j.sidecar_rel for j in jobs}
    for gen, split in dirs:
        folder = out / gen / split
        if not folder.is_dir():
            continue
        for path in [*folder.glob("shard-*.tmp"), *folder.glob("shard-*.tar"), *folder.glob("shard-*.json")]:
            if path.relative_to(out).as_posix() not in planned:
                path.unlink()


def default_workers() -> int:
    """CPUs this process may use (respects taskset/Slurm affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork on Linux (as torch's DataLoader does): workers start at once, and a caller's script
    # needs no `if __name__ == "__main__"` guard, which spawn/forkserver would require because
    # they re-import the main module. Workers only use PIL and tarfile, never torch's threads.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                               initializer=die_with_parent, initargs=(os.getpid(),))  # fmt: skip


def run_jobs(
    jobs: list[Any], workers: int, bar: tqdm, write: Callable[[Any], dict[str, Any]] = _write_one_shard
) -> dict[str, dict[str, Any]]:
    """Write the shards of `jobs` with `write` (a module-level function: it goes to the pool), one per task;
    `workers` > 1 uses a process pool."""
    done: dict[str, dict[str, Any]] = {}

    def finished(sidecar: dict[str, Any]) -> None:
        done[sidecar["path"]] = sidecar
        bar.update(sidecar["count"] + len(sidecar["skipped"]))
        skipped = sum(len(s["skipped"]) for s in done.values())
        if skipped:
            bar.set_postfix(unreadable=skipped, refresh=False)

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            finished(write(job))
        return done
    pool = _pool(min(workers, len(jobs)))
    try:
        with sigterm_raises():  # SIGTERM: the workers are stopped below, not orphaned (child_processes.py)
            pending: set[Future] = {pool.submit(write, job) for job in jobs}
            while pending:
                ready, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in ready:
                    finished(fut.result())  # re-raises a worker's error here
    except BrokenProcessPool as exc:
        raise DataError(
            f"a shard worker died while writing to {jobs[0].out} (out of memory on a huge image?); "
            "re-run with fewer --workers: finished shards are kept"
        ) from exc
    except BaseException:
        # an error, Ctrl-C or SIGTERM: stop the running shards too (their .tmp goes on the next run)
        terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return done
