"""Images/s, MFU and peak memory of ds_trainer.Trainer on real CLIP architectures (the GPU suite's body).

For each model × loader it trains `ds_trainer.Trainer` for a short epoch and reports the steady-state
images/s (from the wall time of each optimizer step in steps.jsonl, after `--skip` warm-up steps),
MFU (the Trainer's counted FLOPs per sample × images/s over the device peak it uses: the datasheet
value on a GPU in its table), the peak memory (`torch.cuda.max_memory_allocated`; peak RSS on CPU) and
the fraction of the epoch spent waiting for data.

- models: `b32` and `l14` are CLIP ViT-B/32 and ViT-L/14 vision towers at 224 px with the exact
  architecture of openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14 (random init: the
  weights may not be reachable; speed does not depend on them); `tiny` is the 64-wide test model.
- loaders: `memory` feeds pre-made batches already on the device (the compute-bound upper bound);
  `stream` streams WebDataset shards of synthetic 256² JPEGs (GenImage's reals are JPEG) through the
  real `make_shard_loader` with `--workers` decode processes.

Each model × loader runs in its own process so that one run's memory cannot inflate the next's peak
(`--row-timeout` caps each). The order is every model with device batches, then every model with the
streaming loader; the JSON is rewritten after each run, so a run that is stopped keeps the rows before it.

    python benchmarks/gpu_bench.py                                  # on a GPU: b32, l14 × memory, stream
    python benchmarks/gpu_bench.py --models tiny --loaders memory,stream --steps 4 --cpu   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import md_table, write_result  # noqa: E402 - importable once the folder is on sys.path

# vision_config of the released checkpoints (config.json on the hub).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "b32": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "patch_size": 32, "image_size": 224, "projection_dim": 512, "hidden_act": "quick_gelu"},
    "l14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "patch_size": 32, "image_size": 224, "projection_dim": 64},
}  # fmt: skip
NAMES = {"b32": "CLIP ViT-B/32", "l14": "CLIP ViT-L/14", "tiny": "tiny CLIP"}


def model_dir(root: Path, arch: str) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    out = root / f"clip-{arch}"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**ARCHITECTURES[arch])).save_pretrained(out)
    return out


def stream_shards(root: Path, images: int, workers: int) -> Path:
    from data_throughput import write_tree

    shards = root / "shards"
    if not (shards / "manifest.json").is_file():
        write_tree(root / "src", shards, sizes=[256], formats=["jpeg"], per_set=images, workers=workers)
    elif sum(sc["count"] for sc in json.loads((shards / "manifest.json").read_text())["shards"]) < images:
        raise RuntimeError(f"{shards} holds fewer than the {images} images this run needs")
    return shards


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One model × loader in this process; returns its measurements."""
    from ds_trainer import CLIPModel, Trainer
    from ds_trainer.data.pipeline import make_shard_loader
    from ds_trainer.distributed import init_distributed

    init_distributed()
    cuda = torch.cuda.is_available() and not spec["cpu"]
    device = torch.device("cuda") if cuda else torch.device("cpu")
    work = Path(spec["work"])
    bs, steps = spec["batch_size"], spec["steps"] + spec["skip"]
    model = CLIPModel(str(model_dir(work, spec["model"])), gradient_checkpointing=spec["gradient_checkpointing"])
    if spec["loader"] == "memory":
        g = torch.Generator().manual_seed(0)
        dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        loader: Any = [(torch.randn(bs, 3, 224, 224, generator=g).to(device, dtype), torch.randint(0, 2, (bs,)).to(device))
                       for _ in range(steps)]  # fmt: skip
    else:
        loader = make_shard_loader(stream_shards(work, spec["stream_images"], spec["workers"]), "train", batch_size=bs, train=True,
                                   num_workers=spec["workers"], image_size=224, shuffle_buffer=0,
                                   pin_memory=cuda)  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_dir = work / f"run-{spec['model']}-{spec['loader']}"
    if cuda and spec["torch_adam"]:
        # No nvcc for DeepSpeed's FusedAdam JIT build: torch's fused AdamW through DeepSpeed instead.
        (work / "torch_adam.json").write_text(
            json.dumps({"optimizer": {"params": {"torch_adam": True, "fused": True}}})
        )
    trainer = Trainer(model, loader, None, device="cpu" if not cuda else None, checkpoint_dir=str(run_dir / "ckpt"),
                      run_dir=run_dir, num_epochs=1, warmup_epochs=0, batch_size=bs, learning_rate=1e-4,
                      zero_stage=spec["zero_stage"], precision=spec["precision"], save_frequency=0)  # fmt: skip
    trainer.cfg.logging.log_every_n_steps = steps
    trainer.cfg.logging.tensorboard = False
    if cuda and spec["torch_adam"]:
        trainer.cfg.deepspeed.config_file = str(work / "torch_adam.json")
    (row,) = trainer.train()
    times = [json.loads(line)["time"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    skip = min(spec["skip"], len(times) - 2)
    step_s = (times[-1] - times[skip]) / (len(times) - 1 - skip)
    images_per_s = bs / step_s
    meter = trainer.mfu
    peak_mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **{k: spec[k] for k in ("model", "loader", "batch_size", "zero_stage", "precision", "gradient_checkpointing")},
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()),
        "images_per_s": images_per_s,
        "step_s": step_s,
        "gflop_per_image": meter.flops_per_sample / 1e9 if meter and meter.flops_per_sample else None,
        "mfu": meter.mfu(images_per_s, 1.0) if meter else None,
        "peak_tflops_per_device": meter.peak.per_device / 1e12 if meter else None,
        "peak_source": meter.peak.source if meter else None,
        "peak_memory_gib": peak_mem / 2**30,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS",
        "data_wait_fraction": row["data_wait_fraction"],
        "epoch_samples_per_s": row["samples_per_s"],
    }


def write_rows(args: argparse.Namespace, argv: list[str] | None, rows: list[dict[str, Any]], planned: int, cuda: bool,
               precision: str, torch_adam: bool) -> None:  # fmt: skip
    """The result file for the runs so far (of `planned`)."""
    ok = [r for r in rows if "error" not in r]
    table = md_table(
        ["model", "loader", "batch", "img/s", "GFLOP/img", "MFU", "peak memory, GiB", "data wait"],
        [[NAMES[r["model"]], r["loader"], r["batch_size"], f"{r['images_per_s']:.0f}",
          f"{r['gflop_per_image']:.1f}" if r["gflop_per_image"] else "-", f"{r['mfu']:.1%}" if r["mfu"] else "-",
          f"{r['peak_memory_gib']:.2f}", f"{r['data_wait_fraction']:.1%}"] for r in ok]
        + [[NAMES[r["model"]], r["loader"], r["batch_size"], f"failed: {r['error']}", "", "", "", ""]
           for r in rows if "error" in r],
    )  # fmt: skip
    device = ok[0]["device"] if ok else ("GPU" if cuda else "cpu")
    markdown = table + (
        f"\n\n{device}, {precision}, ZeRO {args.zero_stage}, {args.steps} timed steps after {args.skip}, one rank; "
        f"optimizer {'torch fused AdamW via DeepSpeed (torch_adam)' if cuda and torch_adam else 'DeepSpeed default'}; "
        f"MFU against {ok[0]['peak_source'] if ok else '?'}. Memory: {ok[0]['peak_memory_kind'] if ok else '?'}. "
        "Data wait: the fraction of the epoch's wall time spent waiting for the next batch. "
        "Reference: timm trains ViT-B/32 at 224 px at about 1,700 img/s on an RTX 3090 with AMP."
    )
    if len(rows) < planned:
        markdown += f" Partial: {len(rows)} of {planned} runs so far."
    summary = "; ".join(f"{NAMES[r['model']]} {r['loader']} {r['images_per_s']:.0f} img/s MFU {r['mfu'] or 0:.1%}"
                        for r in ok) or "all runs failed"  # fmt: skip
    if len(rows) < planned:
        summary += f" ({len(rows)} of {planned} runs)"
    write_result("gpu_suite", args.out, argv, summary, markdown, rows=rows, planned_runs=planned,
                 settings={**{k: v for k, v in vars(args).items() if k != "one"}, "precision": precision,
                           "torch_adam": torch_adam})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--models", default="b32,l14", help=f"comma-separated, of {', '.join(ARCHITECTURES)}")
    p.add_argument("--loaders", default="memory,stream", help="memory (pre-made device batches), stream (shards)")
    p.add_argument("--batch-sizes", default="b32=256,l14=64,tiny=8", help="per model, per rank")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps (after --skip)")
    p.add_argument("--skip", type=int, default=5, help="untimed warm-up steps")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="stream: decode workers")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--precision", default=None, help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--torch-adam",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch's fused AdamW instead of DeepSpeed's FusedAdam (default: when nvcc is missing)",
    )
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU (smoke test)")
    p.add_argument("--row-timeout", type=float, default=0, help="seconds each model × loader run may take (0: no cap)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/gpu_suite.json)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one spec (JSON) in this process
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0

    import shutil

    cuda = torch.cuda.is_available() and not args.cpu
    precision = args.precision or ("bf16" if cuda else "fp32")
    torch_adam = args.torch_adam if args.torch_adam is not None else shutil.which("nvcc") is None
    sizes = dict(item.split("=") for item in args.batch_sizes.split(","))
    models = [m.strip() for m in args.models.split(",")]
    loaders = [x.strip() for x in args.loaders.split(",")]
    for m in models:
        if m not in ARCHITECTURES:
            p.error(f"unknown model {m!r}; choose from {', '.join(ARCHITECTURES)}")
    specs = [{"model": m, "loader": loader, "batch_size": int(sizes.get(m, 32)), "steps": args.steps,
              "skip": args.skip, "workers": args.workers, "zero_stage": args.zero_stage, "precision": precision,
              "gradient_checkpointing": args.gradient_checkpointing, "torch_adam": torch_adam, "cpu": args.cpu}
             for loader in loaders for m in models]  # fmt: skip
    # One shard set for every streaming run: as many images as the largest epoch needs.
    stream_images = max(s["batch_size"] * (s["steps"] + s["skip"]) for s in specs)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ds_trainer_gpu_") as tmp:
        work = Path(args.work or tmp)
        for spec in specs:
            spec.update(work=str(work), stream_images=stream_images)
            m, loader = spec["model"], spec["loader"]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                      text=True, check=False, timeout=args.row_timeout or None)  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                rows.append({**spec, "error": f"over its {args.row_timeout:.0f} s cap (--row-timeout)"})
                print(str(exc.stderr or "")[-3000:], file=sys.stderr)
            else:
                found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not found:
                    print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                    rows.append({**spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                else:
                    rows.append({**json.loads(found[-1][len("RESULT ") :]), "wall_s": time.perf_counter() - t0})
            row = rows[-1]
            if "error" in row:
                print(f"{m} {loader}: FAILED ({row['error']})", flush=True)
            else:
                print(f"{NAMES[m]} {loader}: {row['images_per_s']:.0f} img/s, MFU {row['mfu'] or 0:.1%}, peak "
                      f"{row['peak_memory_gib']:.1f} GiB, data wait {row['data_wait_fraction']:.1%} "
                      f"({row['wall_s']:.0f} s)", flush=True)  # fmt: skip
            # After every run, so that a suite stopped at its cap keeps what finished.
            write_rows(args, argv, rows, len(specs), cuda, precision, torch_adam)
    ok = [r for r in rows if "error" not in r]
    return 0 if ok and len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
