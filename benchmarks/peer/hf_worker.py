"""One rank of the Hugging Face contender of vs_hf_trainer.py (started by the deepspeed launcher).

transformers.Trainer trains one epoch over the same saved tensors, with its DeepSpeed integration
(the DeepSpeed JSON given in --ds-config). A callback records the wall time of every optimizer
step; rank 0 writes --out. Nothing is saved, evaluated or logged.

On a CPU, accelerate (1.15) starts DeepSpeed's process group only for CUDA-like devices: every rank
of a multi-rank launch takes itself for a world of one and HF's batch arithmetic fails against
DeepSpeed's. So there the worker configures accelerate's PartialState for DeepSpeed itself (the
CPU accelerator's backend, gloo) and hands it to HF with `use_configured_state`; HF's Trainer,
its DeepSpeed integration, sampler sharding and loop are otherwise untouched. On a GPU nothing
of this runs.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.peer.shared import build_model, load_dataset, trainer_config, worker_parser, write_json


class LossWrapper(nn.Module):
    """forward(pixel_values, labels) -> {"loss", "logits"}: the same cross-entropy as Trainer.calculate_loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.model(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


def main() -> int:
    p = worker_parser(__doc__.split("\n\n")[0])
    p.add_argument("--ds-config", required=True, help="the DeepSpeed JSON ds_trainer derived, given verbatim")
    args = p.parse_args()

    from transformers import Trainer, TrainerCallback, TrainingArguments

    ds_config = json.loads(Path(args.ds_config).read_text())
    opt = ds_config["optimizer"]["params"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = not torch.cuda.is_available()
    step_end: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end.append(time.time())

    configured = cpu and configure_cpu_state()
    same_param_groups_as_ds_trainer(trainer_config(args.run_dir, args.batch_size, 1).training)
    training_args = TrainingArguments(
        output_dir=args.run_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_train_epochs=1, max_steps=args.steps, learning_rate=opt["lr"], weight_decay=opt.get("weight_decay", 0.0),
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=ds_config.get("gradient_clipping", 0.0),
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        bf16=bool(ds_config.get("bf16", {}).get("enabled")), fp16=bool(ds_config.get("fp16", {}).get("enabled")),
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_drop_last=True, dataloader_pin_memory=not cpu,
        remove_unused_columns=False, seed=0, train_sampling_strategy="sequential", deepspeed=ds_config,
        accelerator_config={"use_configured_state": configured},
    )  # fmt: skip
    dataset = load_dataset(args.data, args.steps * args.batch_size * world)
    trainer = Trainer(model=LossWrapper(build_model(args.model_dir)), args=training_args, train_dataset=dataset,
                      callbacks=[StepTimes()])  # fmt: skip
    try:
        result = trainer.train()
    finally:
        _remove_shm_buffers()
    if trainer.is_world_process_zero():
        plugin = trainer.accelerator.state.deepspeed_plugin
        write_json(args.out, {
            "contender": "hf",
            "world_size": world,
            "hf_world_size": training_args.world_size,
            "configured_state": configured,
            "step_end_time": step_end,
            "ds_config": plugin.deepspeed_config,
            "train_loss": result.training_loss,
            "optimizer": type(trainer.optimizer).__name__,
            "param_groups": len(getattr(trainer.optimizer, "param_groups", [])),
            "torch_threads": torch.get_num_threads(),
            "finished": time.time(),
        })  # fmt: skip
    return 0


def same_param_groups_as_ds_trainer(training: Any) -> None:
    """DeepSpeed builds HF's optimizer from the JSON's `optimizer` block over the groups ds_trainer makes.

    HF hands DeepSpeed `model.parameters()`, one group, so weight decay would also hit biases and
    norms. HF's own grouping (used only when the JSON has no optimizer block) differs too: it
    decays 1-d parameters that are not biases or LayerNorm weights (CLIP's class embedding) and
    would replace DeepSpeed's AdamW by torch's. So the JSON stays verbatim and only the parameters
    change: `transformers.integrations.deepspeed.deepspeed_optim_sched` (called by HF's
    deepspeed_init with the trainable parameters) gets `ds_trainer.optim.param_groups` of the model
    instead, which accelerate passes to `deepspeed.initialize` as `model_parameters`.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    from ds_trainer.optim import param_groups

    original = hf_deepspeed.deepspeed_optim_sched

    def grouped(trainer, hf_deepspeed_config, args, num_training_steps, model_parameters):
        groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(trainer.model, training)]
        return original(trainer, hf_deepspeed_config, args, num_training_steps, groups)

    hf_deepspeed.deepspeed_optim_sched = grouped


def configure_cpu_state() -> bool:
    """Start accelerate's PartialState as DeepSpeed on the CPU accelerator's backend (see the module doc)."""
    from accelerate import PartialState
    from deepspeed.accelerator import get_accelerator

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read again when HF's Trainer builds its Accelerator
    PartialState(backend=get_accelerator().communication_backend_name())
    return True


def _remove_shm_buffers() -> None:
    """DeepSpeed's CPU all-reduce leaves a 66 MiB /dev/shm file per rank; ds_trainer unlinks its own, HF does not."""
    port = os.environ.get("MASTER_PORT")
    if not port:
        return
    rank = os.environ.get("RANK", "0")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        with contextlib.suppress(OSError):
            os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
