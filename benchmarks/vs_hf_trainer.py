"""ds_trainer.Trainer vs Hugging Face transformers.Trainer + DeepSpeed: samples/s and time to the first step.

Both train the same random-init CLIP vision tower + linear head (`ds_trainer.CLIPModel` of a small
local config), on the same pre-generated seeded tensors served the same way (an in-memory
map-style dataset, 0 loader workers, in order), with the same per-rank batch, number of steps,
precision, ZeRO stage, optimizer (DeepSpeed's AdamW from the JSON, over the same two parameter
groups: no decay on biases/norms), clipping and constant LR.
HF gets the DeepSpeed JSON ds_trainer derives for the run, verbatim; both effective configs
are recorded. Each contender is a real `deepspeed --num_gpus N` launch of a worker script
(benchmarks/peer/), so each launch pays imports, process group and engine start-up:

  time to first step: from spawning the launcher to rank 0's first completed optimizer step
                      (ds_trainer: steps.jsonl's "time"; HF: a TrainerCallback's on_step_end)
  samples/s:          steady state, rank 0's step times after the first --warmup-steps steps,
                      times the global batch

Repeats alternate the contenders (the order rotates per repeat and world size); the ratio
ds_trainer/HF is taken per repeat, and median and range are reported. On a CPU every launch gets
OMP_NUM_THREADS = cores / ranks (ds_trainer would pick that itself; HF would oversubscribe).

    python benchmarks/vs_hf_trainer.py                            # ~5 minutes on 2 cores
    python benchmarks/vs_hf_trainer.py --world-sizes 2 --repeats 3 --zero-stage 2
    python benchmarks/vs_hf_trainer.py --defaults   # each tool at its documented defaults (peer/defaults.py)
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never waits for a download

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from benchmarks.common import REPO, fmt_spread, md_table, spread, write_result
from benchmarks.peer import defaults
from benchmarks.peer.shared import trainer_config
from benchmarks.step_overhead import build_model, make_batches, small_clip_dir

CONTENDERS = ("ds_trainer", "hf")
WORKERS = {"ds_trainer": REPO / "benchmarks" / "peer" / "ds_trainer_worker.py",
           "hf": REPO / "benchmarks" / "peer" / "hf_worker.py"}  # fmt: skip
# Set by a launcher around this process; the launched job must get its own.
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "CROSS_RANK", "CROSS_SIZE")  # fmt: skip


def deepspeed_launcher() -> str:
    here = Path(sys.executable).parent / "deepspeed"
    return str(here) if here.exists() else "deepspeed"


def derived_ds_config(run_dir: Path, args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON ds_trainer.Trainer derives for this run (and writes to <run_dir>/ds_config.json)."""
    from ds_trainer.distributed import detect_device
    from ds_trainer.ds_config import build_ds_config

    return build_ds_config(trainer_config(run_dir, args.batch_size, args.zero_stage), world_size, args.steps,
                           detect_device())  # fmt: skip


def launch(contender: str, world_size: int, args: argparse.Namespace, work: Path, tag: str,
           extra: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """One `deepspeed --num_gpus N` launch of a worker; rank 0's step times and config, and the launch time."""
    from ds_trainer.distributed import _free_port

    port = _free_port()
    run_dir, out, log = work / tag, work / f"{tag}.json", work / f"{tag}.log"
    cmd = [deepspeed_launcher(), "--num_gpus", str(world_size), "--master_port", str(port), str(WORKERS[contender]),
           "--model-dir", str(work / "clip-small"), "--data", str(work / "data.pt"), "--run-dir", str(run_dir),
           "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]  # fmt: skip
    cmd += ["--ds-config", str(work / f"ds_config_{world_size}.json")] if contender == "hf" else [
        "--zero-stage", str(args.zero_stage)]  # fmt: skip
    cmd += list(extra)
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS and not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size))
    started = time.time()
    try:
        with log.open("w") as f:
            proc = subprocess.run(
                cmd, check=False, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.launch_timeout
            )
    finally:
        _remove_shm_buffers(port)
    wall = time.time() - started
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{contender} at world size {world_size} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    times = result["step_end_time"]
    if len(times) != args.steps:
        raise RuntimeError(f"{contender}: {len(times)} step times recorded, {args.steps} expected")
    if result.get("hf_world_size", world_size) != world_size:
        raise RuntimeError(f"HF's Trainer saw a world of {result['hf_world_size']} in a {world_size}-rank launch")
    skip = min(args.warmup_steps, len(times) - 2)
    global_batch = args.batch_size * world_size
    step_times = [b - a for a, b in itertools.pairwise(times)]
    return {
        "samples_per_s": (len(times) - 1 - skip) * global_batch / (times[-1] - times[skip]),
        # Robust to the stalls of a shared machine: the global batch over the median steady step time.
        "samples_per_s_median_step": global_batch / max(statistics.median(step_times[skip:]), 1e-3),
        "time_to_first_step_s": times[0] - started,
        "launch_wall_s": wall,
        "master_port": port,
        "step_time_s": [round(t, 4) for t in step_times],
        "train_loss": result["train_loss"],
        "optimizer": result.get("optimizer"),
        "param_groups": result.get("param_groups"),
        "torch_threads": result.get("torch_threads"),
        "configured_state": result.get("configured_state"),
        "poll_s": result.get("poll_s"),
        "ds_config": result["ds_config"],
    }


def _remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce files of this launch, if a worker died before removing its own."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _finite(value: Any) -> Any:
    """JSON without Infinity (accelerate sets steps_per_print to inf)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def config_differences(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two DeepSpeed JSONs (a false/absent precision section counts as equal)."""
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (key in ("fp16", "bf16") and not (a or {}).get("enabled") and not (b or {}).get("enabled")):
            out.append(f"{prefix}{key}: ds_trainer {json.dumps(_finite(a))}, hf {json.dumps(_finite(b))}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world-sizes", default="1,2", help="comma-separated ranks per launch (--num_gpus)")
    p.add_argument("--repeats", type=int, default=2, help="launches per contender per world size")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per launch (one epoch)")
    p.add_argument("--warmup-steps", type=int, default=4, help="first steps left out of samples/s")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument(
        "--hidden", type=int, default=None, help="width of the random-init CLIP tower (256; --defaults: 128)"
    )
    p.add_argument("--layers", type=int, default=None, help="its layers (6; --defaults: 2)")
    p.add_argument("--image-size", type=int, default=None, help="default 112 (--defaults: 224, ds_trainer's default)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default 16; --defaults: 32, ds_trainer's)")
    p.add_argument("--launch-timeout", type=int, default=600, help="seconds one launch may take")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/vs_hf_trainer[_defaults].json)")
    defaults.add_arguments(p)
    args = p.parse_args(argv)
    world_sizes = [int(w) for w in args.world_sizes.split(",") if w.strip()]
    if args.steps < 2 or not world_sizes or min(world_sizes) < 1 or args.repeats < 1:
        p.error("need --steps >= 2, --repeats >= 1 and world sizes >= 1")
    # --defaults: a tower whose CPU step is near the loader's rate, so the data path shows (peer/defaults.py).
    args.hidden = args.hidden or (128 if args.defaults else 256)
    args.layers = args.layers or (2 if args.defaults else 6)
    args.patch_size = args.patch_size or (32 if args.defaults else 16)
    args.image_size = args.image_size or (224 if args.defaults else 112)
    args.batch_size = args.batch_size or (32 if args.defaults else 16)
    if args.defaults:
        args.world_sizes = world_sizes
        return defaults.run(args, argv)

    # The parent imports both trainers first, so neither launch is the one that warms the page cache.
    import transformers  # noqa: F401

    from ds_trainer import Trainer  # noqa: F401

    raw: dict[int, dict[str, list[dict[str, Any]]]] = {w: {c: [] for c in CONTENDERS} for w in world_sizes}
    order: list[str] = []
    configs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ds_trainer_vs_hf_") as tmp:
        work = Path(tmp)
        small_clip_dir(work, args.image_size, args.hidden, args.layers, args.patch_size)
        n_params = sum(q.numel() for q in build_model(work / "clip-small").parameters())
        batches = make_batches(args.steps * max(world_sizes), args.batch_size, args.image_size)
        torch.save({"pixel_values": torch.cat([x for x, _ in batches]), "labels": torch.cat([y for _, y in batches])},
                   work / "data.pt")  # fmt: skip
        del batches
        for w in world_sizes:
            derived = derived_ds_config(work / "derived", args, w)
            (work / f"ds_config_{w}.json").write_text(json.dumps(derived, indent=2))
            configs[w] = {"derived": derived}
        for r in range(args.repeats):
            for i, w in enumerate(world_sizes):
                pair = CONTENDERS if (r + i) % 2 == 0 else CONTENDERS[::-1]
                for c in pair:
                    tag = f"{c}_w{w}_r{r}"
                    order.append(tag)
                    raw[w][c].append(launch(c, w, args, work, tag))
                    m = raw[w][c][-1]
                    print(f"  {tag}: {m['samples_per_s']:.1f} samples/s, first step {m['time_to_first_step_s']:.1f} s "
                          f"after launch, launch {m['launch_wall_s']:.1f} s", flush=True)  # fmt: skip

    per_world: dict[str, Any] = {}
    rows, summary = [], []
    precision = "fp32"
    for w in world_sizes:
        ds_runs, hf_runs = raw[w]["ds_trainer"], raw[w]["hf"]
        ratios = [d["samples_per_s"] / h["samples_per_s"] for d, h in zip(ds_runs, hf_runs)]
        median_step_ratios = [d["samples_per_s_median_step"] / h["samples_per_s_median_step"]
                              for d, h in zip(ds_runs, hf_runs)]  # fmt: skip
        first = {c: spread([m["time_to_first_step_s"] for m in raw[w][c]]) for c in CONTENDERS}
        rate = {c: spread([m["samples_per_s"] for m in raw[w][c]]) for c in CONTENDERS}
        ds_cfg, hf_cfg = ds_runs[-1]["ds_config"], hf_runs[-1]["ds_config"]
        for name in ("bf16", "fp16"):
            if ds_cfg.get(name, {}).get("enabled"):
                precision = name
        per_world[str(w)] = {
            "samples_per_s": rate,
            "ratio": spread(ratios),
            "ratio_median_step": spread(median_step_ratios),
            "time_to_first_step_s": first,
            "first_step_ratio_hf_over_ds_trainer": first["hf"]["median"] / first["ds_trainer"]["median"],
            "train_loss": {c: [m["train_loss"] for m in raw[w][c]] for c in CONTENDERS},
            "optimizer": {c: raw[w][c][-1]["optimizer"] for c in CONTENDERS},
            "param_groups": {c: raw[w][c][-1]["param_groups"] for c in CONTENDERS},
            "torch_threads_per_rank": {c: raw[w][c][-1]["torch_threads"] for c in CONTENDERS},
            "ds_config": {"ds_trainer": ds_cfg, "hf": _finite(hf_cfg),
                          "ds_trainer_wrote_the_derived_one": ds_cfg == configs[w]["derived"],
                          "differences": config_differences(ds_cfg, hf_cfg)},
        }  # fmt: skip
        rows.append([w, fmt_spread(rate["ds_trainer"], 1), fmt_spread(rate["hf"], 1), fmt_spread(spread(ratios)),
                     fmt_spread(spread(median_step_ratios)),
                     f"{first['ds_trainer']['median']:.1f}", f"{first['hf']['median']:.1f}"])  # fmt: skip
        ranks = f"{w} rank{'s' if w > 1 else ''}"
        first_s = f"{first['ds_trainer']['median']:.1f} s vs {first['hf']['median']:.1f} s"
        summary.append(f"{ranks}: ds_trainer/HF samples/s {fmt_spread(spread(ratios))}, first step {first_s}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    table = md_table(["world size", "ds_trainer samples/s", "HF samples/s", "ratio ds_trainer/HF",
                      "ratio, median steps", "ds_trainer first step (s)", "HF first step (s)"], rows)  # fmt: skip
    groups = per_world[str(world_sizes[0])]["param_groups"]
    cpu_note = "" if torch.cuda.is_available() else (
        " (on CPU accelerate sets up DeepSpeed only for a world of one, so the HF worker pre-configures its "
        "PartialState)")  # fmt: skip
    markdown = (
        f"{table}\n\n`ds_trainer.Trainer` vs `transformers.Trainer` + DeepSpeed, each a real `deepspeed --num_gpus N` "
        f"launch on {device}, same CLIP tower + head ({n_params / 1e6:.1f} M params, {args.image_size} px), batch "
        f"{args.batch_size}/rank, {args.steps} steps, {precision}, ZeRO {args.zero_stage}, HF given ds_trainer's "
        f"derived DeepSpeed JSON verbatim (AdamW, clipping, constant LR){cpu_note}; samples/s is steady state "
        f"(after step {args.warmup_steps}), median (range) of {args.repeats} alternated launches (the median-step "
        f"ratio is less sensitive to a shared machine's stalls); first step = seconds from spawning the launcher to "
        f"rank 0's first optimizer step (median). Differences left in: "
        f"ds_trainer runs with its default logging (steps.jsonl, loss and grad norm every 10 steps, MFU counted at "
        f"the first step; no TensorBoard), HF logs nothing. Both optimizers have the same parameter groups "
        f"({groups['ds_trainer']} for ds_trainer, {groups['hf']} for HF: no decay on biases/norms; HF's worker hands "
        f"DeepSpeed ds_trainer's groups in place of model.parameters(), peer/hf_worker.py)"
        + (f"; on CPU both get OMP_NUM_THREADS = cores / ranks, and a shared {os.cpu_count()}-core machine is noisy."
           if not torch.cuda.is_available() else ".")
    )  # fmt: skip
    settings = {**vars(args), "world_sizes": world_sizes, "parameters": n_params, "precision": precision,
                "device": device, "hf_backend": "deepspeed", "order": order,
                "hf_accelerate_state": "pre-configured PartialState (use_configured_state), see peer/hf_worker.py"
                if not torch.cuda.is_available() else "HF's own",
                "omp_num_threads": None if torch.cuda.is_available() else {
                    str(w): max(1, (os.cpu_count() or 1) // w) for w in world_sizes}}  # fmt: skip
    write_result("vs_hf_trainer", args.out, argv, "; ".join(summary), markdown, settings=settings,
                 per_world_size=per_world,
                 raw={str(w): {c: [{k: v for k, v in m.items() if k != "ds_config"} for m in raw[w][c]]
                               for c in CONTENDERS} for w in world_sizes})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
