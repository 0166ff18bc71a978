"""What does the Trainer cost per step? ds_trainer.Trainer vs a bare DeepSpeed loop vs plain PyTorch.

The same model (a small random-init CLIP vision tower + head, built from a config, no download),
the same pre-loaded batches and the same DeepSpeed JSON (the one the Trainer derives and writes):

  (a) engine:  deepspeed.initialize -> engine(x), engine.backward(loss), engine.step(), with the
               Trainer's four parameter groups (so only the loop differs)
  (b) trainer: ds_trainer.Trainer(...).train() for one epoch over the batches, with its default
               logging (TensorBoard, steps.jsonl, MFU); timed from the wall-clock `time` of each
               optimizer step's steps.jsonl row
  (c) torch:   the model, torch.optim.AdamW (same groups) and clip_grad_norm_, no DeepSpeed; in bf16
               the usual PyTorch way: fp32 weights under torch.autocast(bfloat16)

Precision: bf16 on a GPU by default (`--precision`), fp32 on the CPU. fp32 on a GPU allows TF32
matmuls unless `--no-tf32` (the MFU peak follows: flops.py takes the TF32 peak when it is allowed).
On a GPU the batches are made on the device in the step's dtype, so no step copies its input.
`--torch-adam` has DeepSpeed build torch's fused AdamW (and plain PyTorch use it too) instead of
DeepSpeed's FusedAdam, which nvcc must JIT-build first (default: when nvcc is missing).

Step time is the steady state: from the end of step `--skip` to the end of the last step, divided
by the steps in between, the same for all three (the Trainer's one-off costs at its first step, such
as counting the model's FLOPs for MFU, are start-up, like DeepSpeed's own first step). Each repeat
runs the three in turn (the order rotates) in this one process, so the ratios b/a and a/c are
measured under the same machine load; the result is the median and range over repeats. This
machine is noisy: only the ratios mean anything.

    python benchmarks/step_overhead.py                       # about 2-4 minutes on 2 cores
    python benchmarks/step_overhead.py --steps 20 --repeats 3 --out results/step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_spread, md_table, spread, write_result


def small_clip_dir(root: Path, image_size: int, hidden: int, layers: int, patch_size: int = 16) -> Path:
    """A random-init CLIP vision tower saved as a local Hugging Face directory."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), image_size=image_size, patch_size=patch_size,
                           projection_dim=hidden)  # fmt: skip
    torch.manual_seed(0)
    out = root / "clip-small"
    CLIPVisionModel(cfg).save_pretrained(out)
    return out


def make_batches(n: int, batch: int, image_size: int, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """`n` seeded batches; on `device` (made there) in `dtype` when given, else CPU fp32."""
    device = device or torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(batch, 3, image_size, image_size, generator=g, device=device).to(dtype),
             torch.randint(0, 2, (batch,), generator=g, device=device)) for _ in range(n)]  # fmt: skip


def build_model(model_dir: Path) -> torch.nn.Module:
    from ds_trainer import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(str(model_dir))


def run_trainer(model_dir: Path, batches: list, args: argparse.Namespace, work: Path) -> tuple[float, dict, Any]:
    from ds_trainer import Trainer

    run_dir = work / f"trainer-{time.monotonic_ns()}"
    trainer = Trainer(build_model(model_dir), batches, None, device="cpu" if args.cpu else None,
                      checkpoint_dir=str(run_dir / "ckpt"), run_dir=run_dir, num_epochs=1, warmup_epochs=0,
                      batch_size=args.batch_size, learning_rate=1e-4, zero_stage=args.zero_stage,
                      save_frequency=0, precision=args.precision)  # fmt: skip
    if args.torch_adam:
        trainer.cfg.deepspeed.config_file = str(torch_adam_json(work))
    trainer.train()
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    times = [json.loads(line)["time"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return steady_step_time(times, args.skip), ds_config, trainer.mfu


def torch_adam_json(work: Path) -> Path:
    """A DeepSpeed JSON to merge: torch's fused AdamW instead of DeepSpeed's FusedAdam (no nvcc build)."""
    path = work / "torch_adam.json"
    path.write_text(json.dumps({"optimizer": {"params": {"torch_adam": True, "fused": True}}}))
    return path


def steady_step_time(step_ends: list[float], skip: int) -> float:
    """Mean time per step after the first `skip` steps, from each step's end time."""
    skip = min(skip, len(step_ends) - 2)
    if skip < 0:
        raise ValueError("need at least 2 timed steps")
    return (step_ends[-1] - step_ends[skip]) / (len(step_ends) - 1 - skip)


_FORCE_CPU = False  # --cpu


def _sync() -> None:
    """On a GPU, wait for the step to finish before reading the clock (the Trainer's per-step
    non-finite check syncs the same way), so host time is device time."""
    if torch.cuda.is_available() and not _FORCE_CPU:
        torch.cuda.synchronize()


def run_engine(model_dir: Path, batches: list, ds_config: dict, skip: int) -> float:
    import deepspeed

    from ds_trainer.config import TrainingSection
    from ds_trainer.optim import param_groups

    model = build_model(model_dir)
    # The Trainer's parameter groups (no decay on biases/norms; head vs backbone), so that only
    # the loop differs: four groups cost ZeRO and fused Adam a few % over one on this small model.
    t = TrainingSection(
        learning_rate=ds_config["optimizer"]["params"]["lr"],
        weight_decay=ds_config["optimizer"]["params"].get("weight_decay", 0.0),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, t), config=ds_config)
    device, dtype = engine.device, next(engine.module.parameters()).dtype
    ends = []
    for x, y in batches:
        out = engine(x.to(device, dtype))
        loss = F.cross_entropy(out.float(), y.to(device))
        engine.backward(loss)
        engine.step()
        _sync()
        ends.append(time.time())
    return steady_step_time(ends, skip)


def run_torch(model_dir: Path, batches: list, ds_config: dict, skip: int) -> float:
    """Plain PyTorch; the same optimizer kernel as DeepSpeed's (fused when its JSON says torch_adam fused)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not _FORCE_CPU else "cpu")
    model = build_model(model_dir).to(device)
    from ds_trainer.config import TrainingSection
    from ds_trainer.optim import param_groups

    params = [p for p in model.parameters() if p.requires_grad]
    opt_params = ds_config["optimizer"]["params"]
    t = TrainingSection(learning_rate=opt_params["lr"], weight_decay=opt_params.get("weight_decay", 0.0))
    fused = bool(opt_params.get("torch_adam") and opt_params.get("fused"))
    opt = torch.optim.AdamW(param_groups(model, t), fused=fused or None)
    clip = ds_config.get("gradient_clipping")
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    ends = []
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x.to(device) if bf16 else x.to(device, torch.float32))
        loss = F.cross_entropy(out.float(), y.to(device))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        ends.append(time.time())
    return steady_step_time(ends, skip)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per contender per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", type=int, default=3, help="steps not timed at the start of each run (warm-up)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--hidden", type=int, default=256, help="width of the random-init CLIP vision tower")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="fp32 on a GPU: allow TF32 matmuls (default on)")  # fmt: skip
    p.add_argument("--torch-adam", action=argparse.BooleanOptionalAction, default=None,
                   help="torch's fused AdamW via DeepSpeed instead of FusedAdam (default: when nvcc is missing)")  # fmt: skip
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/step_overhead.json)")
    args = p.parse_args(argv)
    global _FORCE_CPU
    _FORCE_CPU = args.cpu
    import shutil

    gpu = torch.cuda.is_available() and not args.cpu
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    if args.torch_adam is None:
        args.torch_adam = gpu and shutil.which("nvcc") is None
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    device = torch.device("cuda") if gpu else None
    dtype = torch.bfloat16 if gpu and args.precision == "bf16" else torch.float32

    from ds_trainer.distributed import init_distributed

    init_distributed()  # a world of one, as under the launcher
    with tempfile.TemporaryDirectory(prefix="ds_trainer_overhead_") as tmp:
        work = Path(tmp)
        model_dir = small_clip_dir(work, args.image_size, args.hidden, args.layers)
        n_params = sum(p.numel() for p in build_model(model_dir).parameters())
        batches = make_batches(args.steps, args.batch_size, args.image_size, device, dtype)
        warm = make_batches(3, args.batch_size, args.image_size, device, dtype)
        _, ds_config, _ = run_trainer(model_dir, warm, args, work)  # warm-up, and the JSON the others use
        run_engine(model_dir, warm, ds_config, 0)
        run_torch(model_dir, warm, ds_config, 0)
        times: dict[str, list[float]] = {"trainer": [], "engine": [], "torch": []}
        meters = []  # the Trainer's MFU meter per repeat: FLOPs per sample and the CPU's measured peak
        order = ["trainer", "engine", "torch"]
        for r in range(args.repeats):
            for name in order[r % 3 :] + order[: r % 3]:
                if name == "trainer":
                    step_time, _, meter = run_trainer(model_dir, batches, args, work)
                    times[name].append(step_time)
                    meters.append(meter)
                elif name == "engine":
                    times[name].append(run_engine(model_dir, batches, ds_config, args.skip))
                else:
                    times[name].append(run_torch(model_dir, batches, ds_config, args.skip))
    trainer_over_engine = [t / e for t, e in zip(times["trainer"], times["engine"])]
    engine_over_torch = [e / t for e, t in zip(times["engine"], times["torch"])]
    toe, eot = spread(trainer_over_engine), spread(engine_over_torch)
    # MFU of each contender: the Trainer's counted FLOPs per sample x samples/s over the matmul rate
    # measured in the same repeat (the Trainer measures it at start-up).
    flops_per_sample = meters[0].flops_per_sample
    peaks = [m.peak.per_device for m in meters]
    mfu = {k: spread([flops_per_sample * args.batch_size / t / peak for t, peak in zip(v, peaks)])
           for k, v in times.items()}  # fmt: skip
    precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"
    stage = ds_config["zero_optimization"]["stage"]
    names = {
        "trainer": "`ds_trainer.Trainer`",
        "engine": "bare DeepSpeed engine loop (same groups, same JSON)",
        "torch": "plain PyTorch (AdamW, clipping)",
    }
    markdown = md_table(
        ["contender", "step time, s (median, range)", "MFU vs measured matmul peak"],
        [[names[k], fmt_spread(spread(v)), fmt_spread(mfu[k])] for k, v in times.items()],
    )
    markdown += "\n\n" + md_table(
        ["ratio (per repeat)", "median (range)", "target"],
        [["Trainer / engine", fmt_spread(toe), "≤ 1.03"], ["engine / PyTorch", fmt_spread(eot), "-"]],
    )
    markdown += (
        f"\n\n{args.repeats} repeats × {args.steps} steps (first {args.skip} untimed), batch "
        f"{args.batch_size}, {args.image_size} px, random-init CLIP vision tower {args.hidden} wide × "
        f"{args.layers} layers = {n_params / 1e6:.1f} M parameters, ZeRO {stage}, {precision}"
        f"{' (TF32 matmuls ' + ('allowed' if args.tf32 else 'off') + ')' if gpu and precision == 'fp32' else ''}, "
        f"optimizer {'torch fused AdamW (DeepSpeed torch_adam; PyTorch the same)' if args.torch_adam else 'DeepSpeed default'}"
        f"{', PyTorch under torch.autocast(bfloat16) with fp32 weights' if precision == 'bf16' else ''}, one rank. "
        f"MFU: {flops_per_sample / 1e9:.3g} GFLOP per sample (forward + backward, counted by the Trainer "
        f"with FlopCounterMode) × samples/s, over the {meters[0].peak.source} rate measured in the "
        f"same repeat (median {statistics.median(peaks) / 1e9:.0f} GFLOP/s)."
    )
    summary = (
        f"trainer/engine step time {fmt_spread(toe)}, engine/torch {fmt_spread(eot)}, {args.repeats} repeats "
        f"of {args.steps} steps, {n_params / 1e6:.1f} M params"
    )
    write_result("step_overhead", args.out, argv, summary, markdown,
                 settings={**vars(args), "parameters": n_params, "zero_stage": stage, "precision": precision},
                 step_time_s={k: spread(v) for k, v in times.items()}, trainer_over_engine=toe,
                 engine_over_torch=eot, raw=times, mfu=mfu, flops_per_sample=flops_per_sample,
                 peak_flops=peaks, ds_optimizer=ds_config["optimizer"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
