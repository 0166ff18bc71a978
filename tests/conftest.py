"""Shared fixtures: tiny GenImage trees and shard sets, and a launcher environment free of this process's ranks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Tests never reach a model hub: fail fast instead of retrying against a closed network.
# (huggingface_hub reads this once, at import, so it must be set before transformers loads.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Set by in-process DeepSpeed tests (a world of one); a launched job must not inherit them.
_RANK_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "DS_ACCELERATOR",
)


def launch_env(**extra: str) -> dict[str, str]:
    # No W&B credentials or mode from the developer's shell: tests never log online.
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS and not k.startswith("WANDB_")}
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


@pytest.fixture(scope="session")
def one_epoch_run(tmp_path_factory, tiny_shards) -> Path:
    """One epoch of the tiny CLIP through the CLI, trained once per session: `ckpt/` (epoch_1, best, latest)
    and `run/`. Read it; copy it to change it."""
    from ds_trainer import cli

    out = tmp_path_factory.mktemp("one_epoch_run")
    cfg = write_config(out / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0})
    assert cli.main(["train", "--config", str(cfg)]) == 0
    return out


@contextlib.contextmanager
def fail_after(seconds: int, why: str) -> Iterator[None]:
    """SIGALRM after `seconds`: what would block forever fails the test instead of hanging the suite."""
    import signal

    def expired(*_: object) -> None:
        raise TimeoutError(f"blocked for {seconds} s: {why}")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def ops_log():
    """Records of ds_trainer.ops at every level, whatever configure_logging did to propagation."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ds_trainer.ops")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def write_config(path: Path, shards: Path, **sections) -> Path:
    cfg = {
        "name": "test",
        "model": {"model_name": "tiny"},
        "data": {"shards": str(shards), "num_workers": 1, "shuffle_buffer": 50},
        "training": {
            "learning_rate": 1e-3,
            "num_epochs": 3,
            "batch_size": 8,
            "warmup_epochs": 1,
            "min_lr": 1e-5,
            "checkpoint_dir": str(path.parent / "ckpt"),
        },
        "deepspeed": {"zero_stage": 1},
        "logging": {"run_dir": str(path.parent / "run"), "log_every_n_steps": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


TreeSpec = dict[str, dict[str, tuple[int, int]]]  # generator -> split -> (n_ai, n_nature)


def _write_tree(root: Path, spec: TreeSpec, size: tuple[int, int] = (40, 32)) -> Path:
    rng = np.random.default_rng(0)
    for gen, splits in spec.items():
        for split, (n_ai, n_nature) in splits.items():
            for cls, n, ext in (("ai", n_ai, "png"), ("nature", n_nature, "jpg")):
                folder = root / gen / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{cls}_{i:03d}.{ext}")
    return root


@pytest.fixture(scope="session")
def make_tree() -> Callable[..., Path]:
    """make_tree(root, {gen: {split: (n_ai, n_nature)}}, size=(w, h)) -> root (ai PNG, nature JPEG)."""
    return _write_tree
