"""The files of an export: assembled beside OUT, given one mode, moved into place; leftovers cleared.

An export is written into `.<out>.tmp-<host>-<pid>` next to OUT and renamed onto OUT when complete
(a previous export is first renamed to `.<out>.old-<host>-<pid>`), so an interrupted export never
leaves a half-written OUT. A process killed meanwhile (SIGKILL, OOM, power) cannot remove its
temporary, so every export first removes those of OUT whose process is gone: same host and no
such pid. A temporary of another host (a shared filesystem) or of a live process is left alone.

Every file gets `0o666 & ~umask` and every directory `0o777 & ~umask` (0644/0755 under the usual
umask 022; 0600/0700 under 077), as any file the user creates: an export is a deliverable, read
by whoever serves the model, and holds no secret. Without this, safetensors wrote the weights
0600 while `config.json` got 0644.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", socket.gethostname()) or "host"


def _name(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{host_name()}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def stale_temporaries(out: Path) -> list[Path]:
    """OUT's temporaries (`.tmp-`/`.old-`) left by processes of this host that no longer run.

    Names without a host (`.<out>.tmp-<pid>`, before hosts were recorded) are taken as this host's.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(?:(?P<host>[^-]+)-)?(?P<pid>\d+)")
    stale = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or (match["host"] is not None and match["host"] != host_name()):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _pid_alive(pid):
            stale.append(entry)
    return sorted(stale)


def staging_dir(out: Path) -> Path:
    """A new, empty temporary directory beside `out` (after removing stale ones) to assemble the export in."""
    for path in stale_temporaries(out):
        log.warning("removing %s, left by an export that was killed", path)
        shutil.rmtree(path, ignore_errors=True)
    tmp = _name(out, "tmp")
    tmp.mkdir(parents=True)
    return tmp


def umask() -> int:
    """This process's umask, read without changing it where /proc tells (threads may create files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_modes() -> tuple[int, int]:
    """(file mode, directory mode) of everything an export writes."""
    mask = umask()
    return 0o666 & ~mask, 0o777 & ~mask


def set_modes(root: Path) -> None:
    """Give every file under `root` the export file mode, and `root` and its directories the directory mode."""
    file_mode, dir_mode = export_modes()
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(folder, name), file_mode)


def publish(tmp: Path, out: Path) -> None:
    """Set the modes in `tmp` and move it onto `out` (a previous export there is replaced)."""
    set_modes(tmp)
    old = _name(out, "old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
