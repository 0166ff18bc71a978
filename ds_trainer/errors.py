"""Errors a user can cause, each with its own exit code.

The CLI turns these into a short message on stderr (no traceback unless --debug);
library users catch them like any exception.
"""

import re


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line for a one-line message (gloo's `[file:line] ` prefix dropped)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"^\[[^\]]*\] ", "", line)[:limit]


class DsTrainerError(Exception):
    """Base class: a problem the user can fix (bad config, missing file, ...)."""

    exit_code = 1


class ConfigError(DsTrainerError):
    """The YAML, a --set override, or a derived DeepSpeed setting is invalid."""

    exit_code = 2


class DataError(DsTrainerError):
    """Shards, manifests or image folders are missing, empty or unreadable."""

    exit_code = 3


class CheckpointError(DsTrainerError):
    """A checkpoint to resume from is missing, incomplete or does not match."""

    exit_code = 4


class TrainingError(DsTrainerError):
    """Training diverged: a non-finite loss (training.on_nonfinite) or non-finite weights at a save."""

    exit_code = 5


class PeerLostError(DsTrainerError):
    """Another rank stopped answering (it died, or the network failed): this rank stopped too."""

    exit_code = 6


class Preempted(DsTrainerError):
    """SIGTERM/SIGUSR1 arrived; every rank saved a checkpoint at the same step and stopped.

    Exit code 75 is sysexits' EX_TEMPFAIL ("try again later"): scripts/slurm/train.sbatch
    requeues the job on it, and the requeued job resumes from that checkpoint.
    """

    exit_code = 75
