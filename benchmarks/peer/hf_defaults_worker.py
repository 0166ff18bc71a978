"""One rank of the HF-at-its-defaults contender of `vs_hf_trainer.py --defaults` (python, or torchrun).

What the Hugging Face docs show for an image classifier on a folder of images: a map-style torch
Dataset that opens and decodes each image in `__getitem__` (PIL, then the same CLIP preprocessing
ds_trainer applies to a training sample, `ds_trainer.data.transforms.Preprocess` at its defaults),
and `TrainingArguments` left at their defaults except batch size, epochs and LR. So: no DeepSpeed,
the default AdamW, linear decay, `dataloader_num_workers=0` (decoding in the training process),
HF's own DDP on more ranks. On a machine without CUDA it also sets `use_cpu=True`, as HF's CPU
training docs do: without it accelerate sets up no process group on a CPU under torchrun (each rank
trains alone, a world of 1); with it, DDP over gloo. One rank trains the same either way. A
callback records the wall time each optimizer step begins (its batch in hand) and ends; rank 0
writes --out.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from PIL import Image
from torch.utils.data import Dataset

from benchmarks.peer.hf_worker import LossWrapper
from benchmarks.peer.shared import build_model, write_json


class ImageFiles(Dataset):
    """(path, label) pairs; each item is decoded and preprocessed when asked for, as in HF's examples."""

    def __init__(self, index: Path, image_size: int) -> None:
        from ds_trainer.data.transforms import Preprocess

        self.items = [(str(index.parent / p), int(y)) for p, y in json.loads(index.read_text())]
        self.preprocess = Preprocess(image_size=image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, label = self.items[i]
        with Image.open(path) as img:
            pixels = self.preprocess(img, label, train=True, rng=random.Random())
        return {"pixel_values": pixels, "labels": torch.tensor(label)}


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--index", required=True, help="JSON list of [relative image path, label]")
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    args = p.parse_args()

    from transformers import Trainer, TrainerCallback, TrainingArguments

    step_begin: list[float] = []
    step_end: list[float] = []

    class StepTimes(TrainerCallback):
        # HF's loop takes the next batch from its DataLoader (decoding it here: 0 workers), then calls
        # on_step_begin: the time from one step's end to the next one's begin is the wait for data
        def on_step_begin(self, args, state, control, **kwargs):
            step_begin.append(time.time())

        def on_step_end(self, args, state, control, **kwargs):
            step_end.append(time.time())

    training_args = TrainingArguments(output_dir=args.run_dir, per_device_train_batch_size=args.batch_size,
                                      num_train_epochs=args.epochs, learning_rate=args.lr,
                                      use_cpu=not torch.cuda.is_available())  # fmt: skip
    dataset = ImageFiles(Path(args.index), args.image_size)
    trainer = Trainer(model=LossWrapper(build_model(args.model_dir)), args=training_args, train_dataset=dataset,
                      callbacks=[StepTimes()])  # fmt: skip
    result = trainer.train()
    if trainer.is_world_process_zero():
        write_json(args.out, {
            "contender": "hf",
            "world_size": training_args.world_size,
            "step_end_time": step_end,
            "step_begin_time": step_begin,
            "train_loss": result.training_loss,
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__,
            "param_groups": len(trainer.optimizer.param_groups),
            "torch_threads": torch.get_num_threads(),
            "dataloader_num_workers": training_args.dataloader_num_workers,
            "finished": time.time(),
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
