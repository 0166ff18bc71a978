"""DeepSpeed's JIT-compiled ops: built once per environment, never again at launch, never in silence.

DeepSpeed compiles its C++ ops (CPU shared-memory all-reduce, fused Adam, CPU Adam: 1-2 min each
on 2 cores) with torch's cpp_extension on first use, by running `ninja` from PATH in
`$TORCH_EXTENSIONS_DIR/<op>` (default `~/.cache/torch_extensions/py311_cpu/<op>`). Two things
made that build happen again and again:

- different ninja versions discard each other's build log (1.11 writes log v5, which 1.13
  throws away, and 1.13's v7 is "too new" for 1.11), so a launch from an activated venv (its
  pip `ninja` first on PATH) and `make` (the system one) rebuilt every op on each switch;
- every checkout and venv on the machine shared the one default directory, and each writes its
  own source and include paths into `build.ninja`, so two environments rebuilt each other's ops.

`pin_build_env`, run when `ds_trainer` is imported (so by `make`'s scripts/build_ops.py, the CLI,
every rank the launcher starts, and Python users alike), gives each environment its own
directory and its own ninja. `install_build_guard` wraps DeepSpeed's op loading: one process per
op builds while the others wait on a lock the kernel releases when its holder dies, rank 0 says
what it is building or waiting for, and a `lock` file left behind by a killed build is removed
instead of being waited on forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXTENSIONS_SUBDIR = "torch_extensions"
LOCK_NAME = "ds_trainer.lock"  # ours, next to torch's own `lock` in each op's build directory
NOTICE_S = 3.0  # a peer's cached load holds the lock ~2 s; say what is awaited only past this
STALE_S = 15 * 60  # without /proc to look for its builder, a torch lock this old is taken for stale
POLL_S = 0.25


# ------------------------------------------------------------------------------------ environment


def _cache_home(environ: MutableMapping[str, str]) -> Path:
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_extensions_dir(
    prefix: str | None = None, base_prefix: str | None = None, environ: MutableMapping[str, str] | None = None
) -> Path:
    """This environment's own op directory: `<venv>/torch_extensions`.

    A venv reached through a symbolic link (`checkout/.venv -> /elsewhere/.venv`) compiles with
    the linked paths in its commands, so it must not share the real venv's directory; it, and any
    interpreter that is not a writable venv (system or conda Python), gets one under
    `~/.cache/ds_trainer/torch_extensions/`, named after its prefix.
    """
    environ = os.environ if environ is None else environ
    prefix = sys.prefix if prefix is None else prefix
    base_prefix = sys.base_prefix if base_prefix is None else base_prefix
    apparent = os.path.abspath(prefix)
    if prefix != base_prefix and os.path.realpath(apparent) == apparent and os.access(apparent, os.W_OK):
        return Path(apparent) / EXTENSIONS_SUBDIR
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", apparent).strip("-")[-48:] or "root"
    digest = hashlib.sha1(apparent.encode()).hexdigest()[:10]
    return _cache_home(environ) / "ds_trainer" / EXTENSIONS_SUBDIR / f"{slug}-{digest}"


def environment_bin(executable: str | None = None) -> Path:
    """The directory of this interpreter as it was invoked (a venv's bin/, not the base Python's)."""
    return Path(os.path.dirname(os.path.abspath(executable or sys.executable)))


def pin_build_env(
    environ: MutableMapping[str, str] | None = None,
    executable: str | None = None,
    prefix: str | None = None,
    base_prefix: str | None = None,
) -> None:
    """Make every op build in this environment use one directory and one ninja. Idempotent.

    TORCH_EXTENSIONS_DIR, when the user set it, wins. The interpreter's own bin directory goes
    first on PATH when it holds a `ninja` (pip's, which deepspeed requires): the one torch's
    build runs, whether or not the venv is activated. Both are exported, so the launcher's ranks
    and every build they start see the same. (The arguments other than `environ` are for tests.)
    """
    environ = os.environ if environ is None else environ
    if not environ.get("TORCH_EXTENSIONS_DIR"):
        environ["TORCH_EXTENSIONS_DIR"] = str(default_extensions_dir(prefix, base_prefix, environ))
    bindir = str(environment_bin(executable))
    if not os.access(os.path.join(bindir, "ninja"), os.X_OK):
        return
    path = [p for p in environ.get("PATH", "").split(os.pathsep) if p]
    if not path or path[0] != bindir:
        environ["PATH"] = os.pathsep.join([bindir, *(p for p in path if p != bindir)])


def extensions_dir() -> Path:
    """Where ops build now: TORCH_EXTENSIONS_DIR (pinned at import) or torch's own default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("x", False)).parent


def needs_build(build_dir: Path) -> bool:
    """Whether torch's `ninja` would compile anything in `build_dir` (a dry run of the same ninja).

    A directory never built, a build log another ninja version wrote, or sources newer than the
    objects all mean work. (With flags that changed since the last build this says no, and
    the build then happens without the announcement.)
    """
    if not (build_dir / "build.ninja").is_file():
        return True
    ninja = shutil.which("ninja")
    if ninja is None:
        return True
    try:
        out = subprocess.run([ninja, "-n", "-C", str(build_dir)], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return True
    return out.returncode != 0 or "no work to do" not in out.stdout


# ---------------------------------------------------------------------------------------- locks


def holder_info(state: str, op: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "op": op, "state": state, "since": time.time()}


def write_holder_info(fd: int, info: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "holder unknown"
    who = f"pid {info['pid']} on {info.get('host', '?')}"
    if info.get("state") == "building":
        return f"{who} is building {info.get('op', 'an op')}; the first build in an environment takes 1-2 min per op"
    return f"{who}, {info.get('state', 'loading')} {info.get('op', 'an op')}"


@contextlib.contextmanager
def build_lock(build_dir: Path, op: str, announce: int, notice_s: float = NOTICE_S) -> Iterator[int | None]:
    """Hold `build_dir/ds_trainer.lock` (flock) while loading `op`; yields its fd, or None without locking.

    The kernel releases a flock when its holder dies, so a killed build cannot leave this lock
    stale. While another process holds it, say what is awaited once, after `notice_s` (sooner
    would be noise: a peer's cached load takes it for a second or two).
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = _read_info(path)
                waited = time.monotonic() - start
                if not told and ((waited > notice_s and info.get("state") == "building") or waited > 10 * notice_s):
                    log.log(announce, "waiting for another process's op build lock %s (%s)", path, _describe(info))
                    told = True
                time.sleep(POLL_S)
            except OSError as exc:
                # A filesystem without flock (Lustre without -o flock): torch's own lock still serialises.
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.debug("cannot flock %s (%s); relying on torch's build lock alone", path, exc)
                yield None
                return
        if told:
            log.log(announce, "got the op build lock %s after %.0f s", path, time.monotonic() - start)
        write_holder_info(fd, holder_info("loading", op))
        try:
            yield fd
        finally:
            write_holder_info(fd, {})
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def live_builders(build_dir: Path, lock: Path) -> list[int] | None:
    """Pids of the processes that hold `lock` open or work in `build_dir`; None without /proc.

    torch's build keeps its `lock` open until it is done, and ninja and the compilers it starts
    run in the build directory: a lock none of them has is one a killed build left behind.
    Processes this user may not inspect (another user's, a container's init) are not counted:
    they could not be building in this environment's directory.
    """
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    cwd_target = os.path.realpath(build_dir)
    pids: list[int] = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/cwd") == cwd_target:
                pids.append(int(entry.name))
                continue
            with os.scandir(f"/proc/{entry.name}/fd") as fds:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) == target:
                            pids.append(int(entry.name))
                            break
        except OSError:
            continue  # ended while we looked, or not ours to inspect
    return pids


def clear_dead_torch_lock(build_dir: Path, announce: int, notice_s: float = NOTICE_S) -> None:
    """Wait while a live process builds in `build_dir`; remove torch's `lock` once no builder is left.

    torch's FileBaton is a bare file, waited on while it exists: left by a killed build, every
    later load waits forever without a word. Called under `build_lock`, so no ds_trainer process
    is building here; a holder can only be another program using this directory.
    """
    lock = build_dir / "lock"
    start = time.monotonic()
    told = False
    while lock.exists():
        pids = live_builders(build_dir, lock)
        if not pids:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                return
            if pids is not None or age > STALE_S:  # without /proc, only age tells
                lock.unlink(missing_ok=True)
                log.warning("removed a stale op build lock (its build was killed %.0f min ago): %s", age / 60, lock)
                return
        if not told and time.monotonic() - start > notice_s:
            who = f"pid {', '.join(map(str, pids))}" if pids else "a builder (no /proc here to tell which)"
            log.log(announce, "waiting for another process's op build lock %s (%s is building there)", lock, who)
            told = True
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------- guard

_guarded = False


def install_build_guard() -> bool:
    """Wrap DeepSpeed's `OpBuilder.jit_load` (every JIT op load, any accelerator) once; True when in place."""
    global _guarded
    if _guarded:
        return True
    try:
        from deepspeed.ops.op_builder.builder import OpBuilder
    except ImportError:
        return False
    original = OpBuilder.jit_load

    def jit_load(self: Any, verbose: bool = True) -> Any:
        return guarded_load(self.name, lambda: original(self, verbose))

    jit_load.__wrapped__ = original  # type: ignore[attr-defined]
    OpBuilder.jit_load = jit_load
    _guarded = True
    return True


def _announce_level() -> int:
    from ds_trainer.distributed import read_env

    return logging.INFO if read_env().rank == 0 else logging.DEBUG


def guarded_load(op: str, load: Any, build_dir: Path | None = None) -> Any:
    """`load()` op `op` under the build lock, saying (on rank 0) when it compiles and how long it took."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(op, False)) if build_dir is None else build_dir
    announce = _announce_level()
    with build_lock(build_dir, op, announce) as fd:
        clear_dead_torch_lock(build_dir, announce)
        building = needs_build(build_dir)
        if building:
            if fd is not None:
                write_holder_info(fd, holder_info("building", op))
            log.log(announce, "building DeepSpeed's %s op (first launch in this environment, 1-2 min per op on 2 "
                    "cores; cached in %s)", op, build_dir.parent)  # fmt: skip
        start = time.perf_counter()
        module = load()
        if building:
            log.log(announce, "built DeepSpeed's %s op in %.0f s", op, time.perf_counter() - start)
        else:
            log.debug("loaded DeepSpeed's %s op from %s (%.1f s)", op, build_dir, time.perf_counter() - start)
    return module
