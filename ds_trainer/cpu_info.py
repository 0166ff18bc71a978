"""py-cpuinfo's answer, computed once per machine instead of twice per op load.

DeepSpeed asks `cpuinfo.get_cpu_info()` for the CPU's architecture and SIMD flags whenever it
loads one of its CPU ops (twice per op: `-march` and the SIMD width; once more per CPU Adam), even
when the op is already built: those flags are part of the build arguments torch compares. Each
call starts a Python subprocess and costs ~1.1 s on 2 cores, so every rank spent ~2.3 s of its
start-up there, and a peer waited for it on the op's build lock.

`install` replaces `cpuinfo.get_cpu_info` with a cached one: in memory for the process, and on
disk in the op directory, keyed by what identifies the CPU (`/proc/cpuinfo`'s vendor, family,
model, stepping, model name and flags, the machine type, the processor count, py-cpuinfo's
version). A machine with another CPU (a CI node with other flags) gets its own entry, so the
build flags are always this CPU's. Only the frequency fields can be stale, and DeepSpeed reads
none of them. Without `/proc/cpuinfo` the answer is cached in memory only.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

_IDENTITY_FIELDS = ("vendor_id", "cpu family", "model", "stepping", "model name", "flags", "features")
_installed = False
_memo: dict[str, Any] | None = None


def identity(cpuinfo_text: str, machine: str, count: int, version: str) -> str:
    """A digest of what decides the build flags: the first processor's identifying fields."""
    first = cpuinfo_text.split("\n\n", 1)[0]
    fields = []
    for line in first.splitlines():
        name, sep, value = line.partition(":")
        name = name.strip()
        if sep and name in _IDENTITY_FIELDS:
            # Flags in a stable order: the same CPU must give the same key.
            fields.append(f"{name}={' '.join(sorted(value.split()))}")
    blob = "\n".join([*sorted(fields), f"machine={machine}", f"count={count}", f"py-cpuinfo={version}"])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_file(directory: Path) -> Path | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    import cpuinfo

    version = getattr(cpuinfo, "CPUINFO_VERSION_STRING", "?")
    return directory / "cpuinfo" / f"{identity(text, platform.machine(), os.cpu_count() or 0, version)}.json"


def forget() -> None:
    """Drop the answer held in memory, as a new process starts (the cache file stays)."""
    global _memo
    _memo = None


def cached_get_cpu_info(compute: Any, directory: Path | None) -> dict[str, Any]:
    """`compute()`'s answer: from memory, else from `directory`'s cache file, else computed and stored."""
    global _memo
    if _memo is not None:
        return copy.deepcopy(_memo)
    path = _cache_file(directory) if directory is not None else None
    if path is not None:
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            if isinstance(info, dict) and "arch" in info and "flags" in info:
                _memo = info
                return copy.deepcopy(info)
    info = compute()
    _memo = copy.deepcopy(info)
    if path is not None:
        # Best effort and atomic: a read-only or full op directory only costs the next process 1 s.
        with contextlib.suppress(OSError, TypeError, ValueError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)
    return copy.deepcopy(info)


def install() -> bool:
    """Make `cpuinfo.get_cpu_info` the cached one (idempotent); False where py-cpuinfo is absent."""
    global _installed
    if _installed:
        return True
    try:
        import cpuinfo
    except ImportError:
        return False
    compute = cpuinfo.get_cpu_info

    def get_cpu_info() -> dict[str, Any]:
        from ds_trainer.ops import extensions_dir

        try:
            directory = extensions_dir()
        except (OSError, RuntimeError, ImportError):  # no default directory to be had: memory only
            directory = None
        return cached_get_cpu_info(compute, directory)

    get_cpu_info.__wrapped__ = compute  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info
    _installed = True
    return True
