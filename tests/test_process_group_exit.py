"""A clean end destroys the process group before the interpreter's finalisation; a failure leaves it.

Left to finalisation, gloo's threads can abort the process ("terminate called without an active
exception"): CI saw a preempted rank exit -6 instead of 75.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ds_trainer import cli
from ds_trainer import distributed as dist_mod
from ds_trainer.errors import ConfigError, Preempted
from tests.conftest import REPO, launch_env

# atexit runs handlers last-in first-out: this one, registered before init_distributed's, runs after it.
_SCRIPT = """
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: print("group at exit:", dist.is_initialized(), flush=True))
from ds_trainer.distributed import end_cleanly, init_distributed
init_distributed(60)
dist.barrier()
if sys.argv[1] == "clean":
    end_cleanly()
"""


@pytest.mark.parametrize("how, left", [("clean", False), ("failed", True)])
def test_the_group_is_destroyed_at_exit_only_after_a_clean_end(tmp_path, how, left):
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, how], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"group at exit: {left}" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.unit
@pytest.mark.parametrize(
    "raised, code, clean",
    [(None, 0, True), (Preempted("stopped at step 3"), 75, True), (ConfigError("bad key"), 2, False)],
)
def test_the_cli_marks_a_clean_end_for_success_and_preemption_only(monkeypatch, raised, code, clean):
    def command(args):
        if raised is not None:
            raise raised
        return 0

    monkeypatch.setattr(dist_mod, "_ended_cleanly", False)
    monkeypatch.setitem(cli._COMMANDS, "ds-config", command)
    assert cli.main(["ds-config", "--config", "unused.yaml", "--world-size", "1"]) == code
    assert dist_mod._ended_cleanly is clean
