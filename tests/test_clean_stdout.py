"""What the commands print: stdout of a data command is only its data, one line per fact, no unlabelled bars.

Real subprocesses and real pipes, as a user types them (`ds-trainer ds-config ... | python -m json.tool`):
DeepSpeed logs its accelerator notice while it is imported, which an in-process call would not show.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, launch_env
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ds_trainer.config import build_config
from ds_trainer.export import export_checkpoint
from ds_trainer.models import build_model
from ds_trainer.trainer import Trainer

CLI = f"{shlex.quote(sys.executable)} -m ds_trainer"


def pipe(command: str, **env: str) -> subprocess.CompletedProcess:
    """`command | python -m json.tool` in bash with pipefail: fails when either side does."""
    line = f"set -o pipefail; {command} | {shlex.quote(sys.executable)} -m json.tool"
    # No DS_ACCELERATOR: DeepSpeed detects the device itself, and says so, as for a user.
    return subprocess.run(["bash", "-c", line], cwd=REPO, env=launch_env(**env), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_ds_config_stdout_is_only_json():
    cmd = f"{CLI} ds-config --config ds_configs/demo.yaml --world-size 2 --steps-per-epoch 10"
    run = pipe(cmd)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json.loads(run.stdout)["train_batch_size"] == 64
    assert "Setting accelerator" not in run.stderr  # DeepSpeed's notice is for the log, not the console
    debug = pipe(cmd.replace(" ds-config", " --debug ds-config"))
    assert debug.returncode == 0, debug.stdout[-2000:] + debug.stderr[-2000:]
    assert "Setting accelerator to CPU" in debug.stderr  # --debug shows it, still off stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(ZeRO-1 checkpoint dir, its export, two images) from one epoch of the tiny model in this process."""
    tmp = tmp_path_factory.mktemp("clean")
    cfg = build_config({
        "model": {"model_name": "tiny"},
        "training": {"num_epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "scheduler": "none",
                     "monitor": "train_loss", "checkpoint_dir": str(tmp / "ckpt")},
        "deepspeed": {"zero_stage": 1},
        "logging": {"run_dir": str(tmp / "run"), "tensorboard": False},
    })  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 224, 224, generator=g), torch.arange(16) % 2)
    torch.manual_seed(0)
    Trainer(build_model(cfg.model), DataLoader(data, batch_size=8), config=cfg, device="cpu").train()
    export = export_checkpoint(tmp / "ckpt", tmp / "export")
    rng = np.random.default_rng(0)
    images = []
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(tmp / name)
        images.append(tmp / name)
    return tmp / "ckpt", export, images


def test_predict_json_stdout_is_only_json(trained):
    _, export, images = trained
    run = pipe(f"{CLI} predict --json --model {export} {' '.join(map(str, images))}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert [r["path"] for r in json.loads(run.stdout)] == [str(p) for p in images]


def test_export_says_once_where_it_wrote(trained, tmp_path):
    ckpt, _, _ = trained
    run = subprocess.run([sys.executable, "-m", "ds_trainer", "export", "--load-dir", str(ckpt), "--out",
                          str(tmp_path / "out")], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len([line for line in lines if "exported" in line]) == 1, lines
    assert str(tmp_path / "out") in lines[-1]


CONVERT = """
import logging, sys
from pathlib import Path
from ds_trainer import checkpoint
logging.basicConfig(level=logging.INFO, format="%(message)s")
checkpoint.to_universal(Path(sys.argv[1]), is_main=True)
"""


def test_universal_conversion_is_one_labelled_line_not_bare_bars(trained):
    # In a process of its own: ds_to_universal forks workers, which hang after this process trained (OpenMP).
    ckpt, _, _ = trained
    run = subprocess.run([sys.executable, "-c", CONVERT, str(ckpt / "epoch_1")], cwd=REPO, env=launch_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (ckpt / "epoch_1" / "universal" / "zero").is_dir()
    assert "it/s" not in run.stderr and "%|" not in run.stderr, run.stderr[-2000:]
    assert "***" not in run.stdout + run.stderr  # its step-by-step prints
    lines = [line for line in run.stderr.splitlines() if line.strip() and "Setting accelerator" not in line]
    assert len(lines) == 2, lines
    assert "converting" in lines[0] and "universal" in lines[0]
    assert lines[1].startswith("converted epoch_1 to the universal format in ")
