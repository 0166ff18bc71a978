"""What does the Trainer cost per step? ds_trainer.Trainer vs a bare DeepSpeed loop vs plain PyTorch.

The same model (a small random-init CLIP vision tower + head, built from a config, no download),
the same pre-loaded batches and the same DeepSpeed JSON (the one the Trainer derives and writes):

  (a) engine:  deepspeed.initialize -> engine(x), engine.backward(loss), engine.step(), with the
               Trainer's four parameter groups (so only the loop differs)
  (b) trainer: ds_trainer.Trainer(...).train() for one epoch over the batches (its own step timing,
               `epoch_time_s`, which excludes checkpointing and evaluation)
  (c) torch:   the model, torch.optim.AdamW (same groups) and clip_grad_norm_, no DeepSpeed

Each repeat runs the three in turn (the order rotates) in this one process, so the ratios b/a and
a/c are measured under the same machine load; the result is the median and range over repeats.
This machine is noisy: only the ratios mean anything.

    python benchmarks/step_overhead.py                       # about 2-4 minutes on 2 cores
    python benchmarks/step_overhead.py --steps 20 --repeats 3 --out results/step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never waits for a download

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def small_clip_dir(root: Path, image_size: int, hidden: int, layers: int) -> Path:
    """A random-init CLIP vision tower saved as a local Hugging Face directory."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), image_size=image_size, patch_size=16,
                           projection_dim=hidden)  # fmt: skip
    torch.manual_seed(0)
    out = root / "clip-small"
    CLIPVisionModel(cfg).save_pretrained(out)
    return out


def make_batches(n: int, batch: int, image_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, image_size, image_size, generator=g), torch.randint(0, 2, (batch,), generator=g))
            for _ in range(n)]  # fmt: skip


def build_model(model_dir: Path) -> torch.nn.Module:
    from ds_trainer import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(str(model_dir))


def run_trainer(model_dir: Path, batches: list, args: argparse.Namespace, work: Path) -> tuple[float, dict]:
    from ds_trainer import Trainer

    run_dir = work / f"trainer-{time.monotonic_ns()}"
    trainer = Trainer(build_model(model_dir), batches, None, device="cpu" if args.cpu else None,
                      checkpoint_dir=str(run_dir / "ckpt"), run_dir=run_dir, num_epochs=1, warmup_epochs=0,
                      batch_size=args.batch_size, learning_rate=1e-4, zero_stage=args.zero_stage,
                      save_frequency=0)  # fmt: skip
    (row,) = trainer.train()
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    return row["epoch_time_s"] / len(batches), ds_config


def run_engine(model_dir: Path, batches: list, ds_config: dict) -> float:
    import deepspeed

    from ds_trainer.config import TrainingSection
    from ds_trainer.optim import param_groups

    model = build_model(model_dir)
    # The Trainer's parameter groups (no decay on biases/norms; head vs backbone), so that only
    # the loop differs: four groups cost ZeRO and fused Adam a few % over one on this small model.
    t = TrainingSection(learning_rate=ds_config["optimizer"]["params"]["lr"],
                        weight_decay=ds_config["optimizer"]["params"].get("weight_decay", 0.0))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, t), config=ds_config)
    device, dtype = engine.device, next(engine.module.parameters()).dtype
    start = time.perf_counter()
    for x, y in batches:
        out = engine(x.to(device, dtype))
        loss = F.cross_entropy(out.float(), y.to(device))
        engine.backward(loss)
        engine.step()
    return (time.perf_counter() - start) / len(batches)


def run_torch(model_dir: Path, batches: list, ds_config: dict) -> float:
    model = build_model(model_dir)
    from ds_trainer.config import TrainingSection
    from ds_trainer.optim import param_groups

    params = [p for p in model.parameters() if p.requires_grad]
    opt_params = ds_config["optimizer"]["params"]
    t = TrainingSection(learning_rate=opt_params["lr"], weight_decay=opt_params.get("weight_decay", 0.0))
    opt = torch.optim.AdamW(param_groups(model, t))
    clip = ds_config.get("gradient_clipping")
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per contender per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--hidden", type=int, default=256, help="width of the random-init CLIP vision tower")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    p.add_argument("--out", default="benchmarks/results/step_overhead.json", help="JSON result")
    args = p.parse_args(argv)

    from ds_trainer.distributed import init_distributed

    init_distributed()  # a world of one, as under the launcher
    with tempfile.TemporaryDirectory(prefix="ds_trainer_overhead_") as tmp:
        work = Path(tmp)
        model_dir = small_clip_dir(work, args.image_size, args.hidden, args.layers)
        n_params = sum(p.numel() for p in build_model(model_dir).parameters())
        batches = make_batches(args.steps, args.batch_size, args.image_size)
        warm = make_batches(3, args.batch_size, args.image_size)
        _, ds_config = run_trainer(model_dir, warm, args, work)  # warm-up, and the JSON the others use
        run_engine(model_dir, warm, ds_config)
        run_torch(model_dir, warm, ds_config)
        times: dict[str, list[float]] = {"trainer": [], "engine": [], "torch": []}
        order = ["trainer", "engine", "torch"]
        for r in range(args.repeats):
            for name in order[r % 3:] + order[: r % 3]:
                if name == "trainer":
                    times[name].append(run_trainer(model_dir, batches, args, work)[0])
                elif name == "engine":
                    times[name].append(run_engine(model_dir, batches, ds_config))
                else:
                    times[name].append(run_torch(model_dir, batches, ds_config))
    trainer_over_engine = [t / e for t, e in zip(times["trainer"], times["engine"])]
    engine_over_torch = [e / t for e, t in zip(times["engine"], times["torch"])]
    result: dict[str, Any] = {
        "benchmark": "step_overhead",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else None,
                    "torch_threads": torch.get_num_threads()},
        "settings": {**vars(args), "parameters": n_params, "zero_stage": ds_config["zero_optimization"]["stage"],
                     "precision": "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"},
        "step_time_s": {k: spread(v) for k, v in times.items()},
        "trainer_over_engine": spread(trainer_over_engine),
        "engine_over_torch": spread(engine_over_torch),
        "raw": times,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    toe, eot = result["trainer_over_engine"], result["engine_over_torch"]
    print(f"step_overhead: trainer/engine step time {toe['median']:.3f} (range {toe['min']:.3f}-{toe['max']:.3f}), "
          f"engine/torch {eot['median']:.3f} (range {eot['min']:.3f}-{eot['max']:.3f}), {args.repeats} repeats of "
          f"{args.steps} steps, {n_params / 1e6:.1f} M params; {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
