"""The deepspeed launcher as `launch.sh` runs it: Ctrl-C ends the job with one line and exit 130.

DeepSpeed's runner waits on its `launch` child without handling SIGINT, so Ctrl-C printed the
runner's KeyboardInterrupt traceback, and every rank printed its own "interrupted". The terminal
sends SIGINT to the whole foreground process group: `launch` stops the ranks by itself, and the
ranks stop on their KeyboardInterrupt. So here the first SIGINT is only noted and the runner goes
on waiting until `launch` has stopped the ranks; then one line, exit 130. Should `launch` still
run after `FORWARD_S` (the SIGINT was sent to this process alone, `kill -INT <pid>`), it gets the
SIGINT too. A second Ctrl-C stops waiting. Ranks started here are told (`LAUNCHED_ENV`), so
they stay quiet on Ctrl-C, and the launcher logs warnings only (`--log_level warning` unless given:
its INFO lines, "Killing subprocess ..." on Ctrl-C among them, are chatter on a console).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

LAUNCHED_ENV = "DS_TRAINER_LAUNCHED"
FORWARD_S = 5.0
INTERRUPTED = "launch.sh: interrupted (Ctrl-C); the job's ranks were stopped (resume with --load-dir <checkpoint_dir>)"


def _forward_sigint_later() -> None:
    time.sleep(FORWARD_S)
    import psutil  # a DeepSpeed dependency

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            child.send_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `deepspeed.launcher.runner` with `argv`; its exit code, or 130 after Ctrl-C."""
    from deepspeed.launcher import runner

    os.environ[LAUNCHED_ENV] = "1"
    interrupted: list[float] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(time.monotonic())
        threading.Thread(target=_forward_sigint_later, daemon=True, name="forward-sigint").start()

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--log_level") or a in ("--quiet", "-q") for a in args):
        args = ["--log_level", "warning", *args]
    previous = signal.signal(signal.SIGINT, on_sigint)
    code: int = 0
    try:
        runner.main(args)
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
