"""Shared fixtures: a tiny demo shard set, and a launcher environment free of this process's ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Set by in-process DeepSpeed tests (a world of one); a launched job must not inherit them.
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "CROSS_RANK", "CROSS_SIZE", "DS_ACCELERATOR")


def launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env["PYTHONPATH"] = str(REPO)
    env["DS_TRAINER_PYTHON"] = sys.executable
    env.update(extra)
    return env


def run_cmd(args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """64 train + 24 val images per generator (2 generators), a few shards each."""
    from ds_trainer.data import make_demo_shards

    out = tmp_path_factory.mktemp("shards") / "demo"
    make_demo_shards(out, train_per_class=32, val_per_class=12, max_count=20, progress=False)
    return out


def write_config(path: Path, shards: Path, **sections) -> Path:
    cfg = {
        "name": "test",
        "model": {"model_name": "tiny"},
        "data": {"shards": str(shards), "num_workers": 1, "shuffle_buffer": 50},
        "training": {"learning_rate": 1e-3, "num_epochs": 3, "batch_size": 8, "warmup_epochs": 1, "min_lr": 1e-5,
                     "checkpoint_dir": str(path.parent / "ckpt")},
        "deepspeed": {"zero_stage": 1},
        "logging": {"run_dir": str(path.parent / "run"), "log_every_n_steps": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path
