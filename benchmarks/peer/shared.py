"""What both workers of vs_hf_trainer.py share: the data, the model, the ds_trainer run config, step timings.

The launcher (`deepspeed --num_gpus N`) starts a worker per rank; each worker loads the same
pre-generated tensors (seeded, saved by vs_hf_trainer.py) into an in-memory map-style dataset
and builds the same random-init CLIP model from the same local directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
CLIP_GRAD_NORM = 1.0


class TensorDictDataset(Dataset):
    """Samples as {"pixel_values", "labels"} dicts: ds_trainer unpacks them, HF's default collator stacks them."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def load_dataset(path: str | Path, n: int) -> TensorDictDataset:
    """The first `n` samples of the saved tensors (steps x batch x world size of them)."""
    data = torch.load(path, mmap=True)
    if len(data["labels"]) < n:
        raise SystemExit(f"{path} holds {len(data['labels'])} samples, {n} needed")
    return TensorDictDataset(data["pixel_values"][:n].clone(), data["labels"][:n].clone())


def build_model(model_dir: str | Path) -> torch.nn.Module:
    from benchmarks.step_overhead import build_model as build

    return build(Path(model_dir))


def trainer_config(run_dir: str | Path, batch_size: int, zero_stage: int) -> Any:
    """The ds_trainer run config of the benchmark: one epoch, constant LR, no TensorBoard or progress bar."""
    from ds_trainer.config import build_config

    run_dir = Path(run_dir)
    return build_config({
        "name": "vs_hf_trainer",
        "training": {"num_epochs": 1, "batch_size": batch_size, "learning_rate": LEARNING_RATE,
                     "weight_decay": WEIGHT_DECAY, "clip_grad_norm": CLIP_GRAD_NORM, "scheduler": "none",
                     "warmup_epochs": 0, "save_frequency": 0, "checkpoint_dir": str(run_dir / "ckpt"),
                     "monitor": "train_loss"},
        "deepspeed": {"zero_stage": zero_stage},
        # The defaults a user gets (loss every 10 steps, MFU counted at the first step) but no TensorBoard,
        # as HF runs with report_to none; steps.jsonl still times every optimizer step.
        "logging": {"run_dir": str(run_dir), "tensorboard": False, "progress_bar": "off"},
    }, source="vs_hf_trainer")  # fmt: skip


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def worker_parser(description: str) -> argparse.ArgumentParser:
    """The arguments both contenders' workers take (each adds its own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher may add it
    return p
