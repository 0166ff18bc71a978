"""Checking each shard entry of a manifest before anything is streamed from it.

The loader takes its epoch lengths from the manifest and opens the files it names, so a manifest
is input to be checked, not trusted: a shard path is relative and stays under the shard root, with
symbolic links resolved (a link inside the root leading outside it is refused, like a `../` or absolute path;
link the whole shard folder instead, the root itself is resolved first); counts are whole numbers
>= 0 that a tar of the recorded size can hold, no larger than the set's max_count, and equal to
those of the shard's sidecar (written next to it by `ds-trainer shard`) where one exists; and no
shard is listed twice. A path that exists must be a regular file (a FIFO would block the reader).
A refusal names the manifest and the entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ds_trainer.data.regular_file import kind_of
from ds_trainer.data.scan import is_inside
from ds_trainer.data.shard_plan import SIDECAR_FORMAT
from ds_trainer.errors import DataError

# Most samples one shard may hold; `ds-trainer shard --max-count` accepts no more. At GenImage's
# ~100 KiB per image that is a 100 GB tar, far above any useful shard size.
MAX_SHARD_SAMPLES = 1_000_000
# Every tar member takes at least one 512-byte header block, and a sample has at least one member:
# a tar of B bytes holds at most B // 512 samples, whatever the manifest says.
TAR_BLOCK = 512

_FIX = "re-create the shards with ds-trainer shard"


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(value: Any) -> str:
    """A value as the JSON had it, cut short (a manifest is untrusted: never echo much of it)."""
    return json.dumps(value, default=str)[:40]


def _sidecar(url: str, rel: str) -> dict[str, Any] | None:
    """The shard's sidecar as `ds-trainer shard` wrote it, or None (none there, unreadable, another shard's)."""
    if not url.endswith(".tar"):
        return None
    try:
        data = json.loads(Path(url[: -len(".tar")] + ".json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or data.get("path") != rel:
        return None
    return data


def shard_url(manifest_file: Path, index: int, rel: Any) -> str:
    """The real path of entry `index`'s shard, refused unless it lies under the manifest's folder."""
    where = f"{manifest_file}: shards[{index}]"
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise DataError(f"{where} has no usable path ({str(rel)[:80]!r}); {_FIX}")
    root_real = os.path.realpath(manifest_file.parent)
    real = os.path.realpath(os.path.join(root_real, rel))
    # absolute: refused even when it names a file inside (a manifest travels with its shards)
    if os.path.isabs(rel) or not is_inside(real, root_real) or real == root_real:
        kind = "an absolute path" if os.path.isabs(rel) else "a path that leads outside the shard folder"
        resolved = "" if real == rel else f" ({real[:200]})"
        raise DataError(
            f"{where} path {rel[:200]!r} is {kind}{resolved}; a shard path is relative to "
            f"{root_real} and stays inside it (symbolic links included); {_FIX}"
        )
    try:
        kind = kind_of(os.stat(real).st_mode)
    except OSError:  # missing: load_manifest warns, and the loader counts its samples as bad
        kind = None
    if kind is not None:
        raise DataError(f"{where} path {rel[:200]!r} is {kind}, not a tar file; {_FIX}")
    return real


def check_counts(manifest_file: Path, index: int, entry: dict[str, Any], url: str, max_count: Any) -> None:
    """Refuse counts no shard can have, or that disagree with the shard's sidecar."""
    where = f"{manifest_file}: shards[{index}] ({str(entry.get('path'))[:200]})"
    for key in ("count", "ai", "nature"):
        if not _whole(entry.get(key)):
            raise DataError(f"{where}: {key} {_shown(entry.get(key))} is not a whole number >= 0; {_FIX}")
    count = entry["count"]
    if entry["ai"] + entry["nature"] != count:
        raise DataError(f"{where}: ai {entry['ai']} + nature {entry['nature']} is not its count {count}; {_FIX}")
    limit, why = MAX_SHARD_SAMPLES, "the most one shard may hold"
    if _whole(max_count) and max_count < limit:
        limit, why = max_count, "the manifest's max_count"
    size = entry.get("bytes")
    if size is not None and not _whole(size):
        raise DataError(f"{where}: bytes {_shown(size)} is not a whole number >= 0; {_FIX}")
    if size is None and os.path.isfile(url):
        size = os.path.getsize(url)
    if size is not None and size // TAR_BLOCK < limit:
        limit, why = size // TAR_BLOCK, f"what a tar of {size} bytes can hold"
    if count > limit:
        raise DataError(f"{where}: count {count} is more than {why} ({limit}); {_FIX}")
    sidecar = _sidecar(url, entry["path"])
    if sidecar is None:
        return
    for key in ("count", "ai", "nature", "bytes"):
        if key in entry and key in sidecar and entry[key] != sidecar[key]:
            raise DataError(
                f"{where}: {key} {entry[key]} disagrees with its sidecar {Path(url).with_suffix('.json').name} "
                f"({sidecar[key]}); {_FIX}"
            )


def check_unique(manifest_file: Path, urls: list[str], paths: list[str]) -> None:
    """Refuse a shard listed twice (by its real path: two spellings of one file count as one)."""
    first: dict[str, int] = {}
    for i, url in enumerate(urls):
        if url in first:
            raise DataError(
                f"{manifest_file}: shards[{i}] ({paths[i][:200]}) is the shard of shards[{first[url]}] again; "
                f"each shard may be listed once (its samples would be scored twice); {_FIX}"
            )
        first[url] = i
