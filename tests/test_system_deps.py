"""scripts/install_system_deps.sh (run by `make test` and .ci/run) on stub commands: what it installs, when, why not."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "scripts" / "install_system_deps.sh"
BASH = "/bin/bash"
ALL = ("slurmctld", "slurmd", "sbatch", "munged", "chromium")


def stubs(tmp_path: Path, present=ALL, uid=0, apt=True, apt_fails=False, fonts=True) -> dict[str, str]:
    """A PATH holding only stub commands; apt-get records its arguments in apt.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def stub(name: str, body: str) -> None:
        (bin_dir / name).write_text(f"#!{BASH}\n{body}\n")
        (bin_dir / name).chmod(0o755)

    for name in present:
        stub(name, "exit 0")
    stub("id", f"echo {uid}")
    status = "install ok installed" if fonts else "unknown ok not-installed"
    stub("dpkg-query", f"printf '%s' '{status}'")
    if apt:
        stub("apt-get", f'echo "$*" >> {tmp_path / "apt.log"}; exit {1 if apt_fails else 0}')
    return {"PATH": str(bin_dir)}


def run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def apt_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


def test_everything_there_is_quick_and_touches_nothing(tmp_path):
    start = time.monotonic()
    out = run(stubs(tmp_path))
    assert out.returncode == 0 and out.stderr == "" and out.stdout == ""
    assert apt_calls(tmp_path) == []
    assert time.monotonic() - start < 5


def test_as_root_installs_only_what_is_missing(tmp_path):
    out = run(stubs(tmp_path, present=("slurmctld", "slurmd", "sbatch", "munged"), fonts=False))
    assert out.returncode == 0, out.stderr
    calls = apt_calls(tmp_path)
    assert calls[0] == "update -qq"
    assert calls[1].endswith("chromium fonts-dejavu-core") and "slurm" not in calls[1] and "munge" not in calls[1]
    assert "installing chromium fonts-dejavu-core" in out.stderr


def test_a_fresh_machine_gets_every_package(tmp_path):
    out = run(stubs(tmp_path, present=()))
    assert out.returncode == 0, out.stderr
    assert apt_calls(tmp_path)[1].split()[-5:] == ["slurmctld", "slurmd", "slurm-client", "munge", "chromium"]


def test_not_root_or_no_apt_get_says_why_and_succeeds(tmp_path):
    (tmp_path / "user").mkdir()
    out = run(stubs(tmp_path / "user", present=(), uid=1000))
    assert out.returncode == 0
    assert "not root" in out.stderr and "skip" in out.stderr
    assert apt_calls(tmp_path / "user") == []

    (tmp_path / "noapt").mkdir()
    out = run(stubs(tmp_path / "noapt", present=(), apt=False))
    assert out.returncode == 0 and "no apt-get" in out.stderr


def test_a_failed_install_is_reported_not_fatal(tmp_path):
    out = run(stubs(tmp_path, present=(), apt_fails=True))
    assert out.returncode == 0
    assert "could not install" in out.stderr


def test_make_test_and_ci_run_it_and_make_test_unit_does_not():
    env = {**os.environ, "MAKEFLAGS": ""}
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "scripts/install_system_deps.sh" in dry.stdout
    assert "scripts/install_system_deps.sh" in (REPO / ".ci" / "run").read_text()
    unit = subprocess.run(["make", "-n", "test-unit"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    if unit.returncode == 0:  # the target exists: pure tests need neither system packages nor the op build
        assert "install_system_deps" not in unit.stdout and "build_ops" not in unit.stdout
