"""What is loaded is what was saved: a sha256 of every checkpoint file, and of the marker itself.

`checkpoint.save` records in the marker (`<tag>/ds_trainer.json`), beside each file's size, the
sha256 of its bytes (`sha256`: name -> hex digest), and seals the marker with the sha256 of its own
content (`marker_sha256`, over the canonical JSON of every other key, so a changed value anywhere in
it is caught however the file is formatted). `verify` checks both before anything unpickles the
files: resume (before `engine.load_checkpoint` and the universal conversion), `export` and `eval`.
A flipped byte anywhere is refused as CheckpointError naming the file; nothing is loaded.

sha256, not a cheaper checksum: measured here at 1.1 GB/s on one core (zlib.crc32 2.3 GB/s, blake2b
0.5 GB/s): about 4 s for a ViT-L/14 checkpoint (4.3 GB) on one rank, and the work is split across
the ranks (they see the same filesystem, as the save already assumes). Against the time a save of that
size takes, crc32's saving is not worth a checksum that is not collision-resistant.

These integrity fields (`files`, `sha256`, `marker_sha256`) belong to the checkpoint storage; the rest
of the marker is resume.py's to interpret. Checkpoints written before layout version 3 record sizes
only: they load after one warning that their content is not verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ds_trainer.errors import CheckpointError, first_line

log = logging.getLogger(__name__)

MARKER = "ds_trainer.json"
DIGESTS = "sha256"
SEAL = "marker_sha256"
FIRST_SEALED_VERSION = 3
LAYOUT = 3  # the marker layout this ds_trainer writes (resume.VERSION); a newer one is resume.upgrade's to refuse
_SHOWN = 4  # problems named in one message


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (a multi-GB optimizer file is never held in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _content_digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )  # NaN/Infinity as json writes them
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> str:
    """The marker's text: `manifest` with the digest of its own content."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return json.dumps({**body, SEAL: _content_digest(body)}, indent=2, sort_keys=True)


def check_seal(raw: dict[str, Any], path: Path) -> None:
    """Refuse a marker whose content is not what was saved (a sealed layout without its seal included)."""
    recorded = raw.get(SEAL)
    if recorded is None:
        if FIRST_SEALED_VERSION <= _version(raw) <= LAYOUT:
            raise CheckpointError(f"{path} is damaged: it has no {SEAL} (every marker of layout version "
                                  f"{FIRST_SEALED_VERSION} or later has one); nothing was loaded")  # fmt: skip
        return
    body = {k: v for k, v in raw.items() if k != SEAL}
    if not isinstance(recorded, str) or recorded != _content_digest(body):
        raise CheckpointError(
            f"{path} is damaged: its content does not match the {SEAL} recorded when it was saved (the file "
            "changed on disk); nothing was loaded. Use another tag (--tag), or restore the file"
        )


def read_sealed(path: Path) -> Any:
    """The marker's JSON, refused when it cannot be parsed or its seal does not match.

    A marker is written atomically, so an unreadable one is damage, never a save cut short.
    """
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged or unreadable ({first_line(exc, 120)}); nothing was loaded") from None
    if isinstance(raw, dict):
        check_seal(raw, path)
    return raw


def _version(raw: dict[str, Any]) -> int:
    try:
        return int(raw.get("version") or 1)
    except (TypeError, ValueError):
        return FIRST_SEALED_VERSION  # unreadable: treat as current, so a missing seal is refused


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(part: list[Any]) -> list[Any]:
    """Every rank's `part`, concatenated (this rank's alone without a process group)."""
    world = _world()[1]
    if world == 1:
        return list(part)
    parts: list[list[Any] | None] = [None] * world
    dist.all_gather_object(parts, list(part))
    return [x for p in parts if p for x in p]


def digests(root: Path, names: list[str], collective: bool = True) -> dict[str, str]:
    """sha256 of each of `names` under `root`. `collective`: every rank calls it and the hashing is split."""
    rank, world = _world() if collective else (0, 1)
    mine = [(name, file_digest(root / name)) for name in names[rank::world]]
    found = dict(_gather(mine) if collective else mine)
    for name in names:  # a rank that listed the directory differently: hash what it missed here
        if name not in found:
            found[name] = file_digest(root / name)
    return found


def verify(tag_dir: Path, collective: bool = False) -> None:
    """Check `tag_dir` against its marker. `collective`: every rank calls it and the ranks share the hashing
    (resume); otherwise this process checks alone (export and eval, which need no process group).

    Refuses, naming the file, a checkpoint whose marker or any listed file differs from what was saved,
    and a `.pt` file the marker does not list (DeepSpeed loads its files by pattern, so an added one
    would be loaded). A checkpoint from before digests loads after one warning.
    """
    path = tag_dir / MARKER
    raw = read_sealed(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a ds_trainer checkpoint record; nothing was loaded")
    sizes, recorded = raw.get("files"), raw.get(DIGESTS)
    rank, world = _world() if collective else (0, 1)
    if recorded is None:
        if rank == 0:
            log.warning("%s was saved by an older ds_trainer (layout version %s) and records no file digests: its "
                        "files are loaded with their sizes checked only; checkpoints saved from now on have "
                        "them", tag_dir, raw.get("version", 1))  # fmt: skip
        return
    if not isinstance(sizes, dict) or not isinstance(recorded, dict):
        raise CheckpointError(f"{path} is damaged: its file list is not a mapping; nothing was loaded")
    outside = [n for n in recorded if Path(n).is_absolute() or ".." in Path(n).parts]
    if outside:
        raise CheckpointError(f"{path} is damaged: it lists {outside[0]!r:.80}, outside {tag_dir}; nothing was loaded")
    gather = _gather if collective else list
    listing = gather(_listing_problems(tag_dir, sizes, recorded) if rank == 0 else [])
    names = sorted(n for n in recorded if (tag_dir / n).is_file() and (tag_dir / n).stat().st_size == sizes.get(n))
    mine = [n for n in names[rank::world] if file_digest(tag_dir / n) != recorded[n]]
    changed = sorted(gather(mine))
    problems = listing + [f"{n} does not match the sha256 recorded when it was saved (the file changed on disk)"
                          for n in changed]  # fmt: skip
    if problems:
        more = f" (+{len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise CheckpointError(
            f"checkpoint {tag_dir} is damaged: {'; '.join(problems[:_SHOWN])}{more}; nothing was loaded. "
            "Use another tag (--tag), or restore the file"
        )


def _listing_problems(tag_dir: Path, sizes: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    out = [f"{n} has no recorded sha256" for n in sorted(sizes) if n not in recorded]
    for name in sorted(recorded):
        file = tag_dir / name
        if not file.is_file():
            out.append(f"missing {name}")
        elif file.stat().st_size != sizes.get(name):
            out.append(f"{name} is {file.stat().st_size} bytes, the marker says {sizes.get(name)}")
    listed = set(recorded)
    out += [f"{p.name} is not listed in {MARKER} (added after the save)"
            for p in sorted(tag_dir.glob("*.pt")) if p.name not in listed]  # fmt: skip
    return out
