"""`vs_hf_trainer.py --defaults`: each tool used as its docs show, on the same real shards.

- ds_trainer: `./launch.sh --config run.yaml` (DS_TRAINER_CPU_RANKS / NUM_GPUS = the world size),
  the YAML holding only the model, the shards, batch size, epochs and LR (and where to write): its
  defaults otherwise, the streaming loader over the shards (data.num_workers 2), evaluation on
  the val split after the epoch (outside the timed steps).
- HF: `python hf_defaults_worker.py` (`torchrun --nproc_per_node N` on more ranks), a map-style
  Dataset decoding the same training images (extracted from the same shards to a folder per
  class, as a user's image folder) in `__getitem__`, default `TrainingArguments` but batch size,
  epochs and LR (dataloader_num_workers 0, AdamW, linear decay, no DeepSpeed), and `use_cpu=True`
  on a machine without CUDA, as HF's CPU docs show (without it a CPU torchrun world is N worlds of 1).

Neither launch gets OMP_NUM_THREADS: each picks its own threads, as a user would get them.
samples/s: rank 0's steady optimizer steps (after --warmup-steps) times the global batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, fmt_spread, md_table, spread, write_result

CONTENDERS = ("ds_trainer", "hf")
_DROP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "OMP_NUM_THREADS", "CROSS_RANK", "CROSS_SIZE")  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def extract_train_images(shards: Path, out: Path) -> int:
    """The shard set's train-split images as files (<out>/<label>/<key>.<ext>) and <out>/index.json."""
    manifest = json.loads((shards / "manifest.json").read_text())
    index: list[tuple[str, int]] = []
    for entry in manifest["shards"]:
        if entry["split"] != "train":
            continue
        with tarfile.open(shards / entry["path"]) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, member in members.items():
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_SUFFIXES:
                    continue
                label = int(tar.extractfile(members[stem + ".cls"]).read().decode().strip())
                rel = Path(str(label)) / Path(name).name
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(tar.extractfile(member).read())
                index.append((str(rel), label))
    (out / "index.json").write_text(json.dumps(sorted(index)))
    return len(index)


def ds_trainer_yaml(path: Path, model_dir: Path, shards: Path, run_dir: Path, args: argparse.Namespace) -> Path:
    """Only what --defaults sets equal (batch size, epochs, LR), plus the model, the data and where to write."""
    path.write_text(
        json.dumps(
            {
                "name": "vs_hf_defaults",
                "model": {"model_name": str(model_dir)},
                "data": {"shards": str(shards), "image_size": args.image_size},
                "training": {
                    "batch_size": args.batch_size,
                    "num_epochs": args.epochs,
                    "learning_rate": args.lr,
                    "checkpoint_dir": str(run_dir / "checkpoints"),
                },
                "logging": {"run_dir": str(run_dir)},
            },
            indent=2,
        )
    )  # fmt: skip  (JSON is YAML)
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def launch(contender: str, world: int, args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    from ds_trainer.distributed import _free_port

    port = _free_port()
    run_dir, out, log = work / tag, work / f"{tag}.json", work / f"{tag}.log"
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(port))
    if contender == "ds_trainer":
        cfg = ds_trainer_yaml(work / f"{tag}.yaml", work / "clip-small", args.shards, run_dir, args)
        env.update(DS_TRAINER_PYTHON=sys.executable, DS_TRAINER_CPU_RANKS=str(world), NUM_GPUS=str(world))
        cmd = ["bash", str(REPO / "launch.sh"), "--config", str(cfg)]
    else:
        worker = [str(REPO / "benchmarks" / "peer" / "hf_defaults_worker.py"), "--model-dir", str(work / "clip-small"),
                  "--index", str(work / "images" / "index.json"), "--image-size", str(args.image_size),
                  "--run-dir", str(run_dir), "--out", str(out), "--batch-size", str(args.batch_size),
                  "--epochs", str(args.epochs), "--lr", str(args.lr)]  # fmt: skip
        cmd = [sys.executable, *worker] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
            *worker]  # fmt: skip
    started = time.time()
    with log.open("w") as f:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=args.launch_timeout)  # fmt: skip
    wall = time.time() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{contender} (defaults) at world size {world} failed (exit {proc.returncode}):\n{tail}")
    if contender == "ds_trainer":
        rows, epochs = _jsonl(run_dir / "steps.jsonl"), _jsonl(run_dir / "metrics.jsonl")
        # the share of its epochs the step spent waiting for a batch (ds_trainer's own data_wait_fraction)
        wait = sum(e["data_wait_s"] for e in epochs) / sum(e["epoch_time_s"] for e in epochs)
        result = {"step_end_time": [r["time"] for r in rows], "data_wait_fraction": wait}
    else:
        result = json.loads(out.read_text())
        begin, end = result.pop("step_begin_time"), result["step_end_time"]
        # after the warm-up steps: from one step's end to the next one's begin, HF's loop fetched (decoded) a batch
        skip = args.warmup_steps
        waits = [begin[i] - end[i - 1] for i in range(skip + 1, len(end))]
        result["data_wait_fraction"] = sum(waits) / (end[-1] - end[skip]) if len(end) > skip + 1 else float("nan")
    times = result["step_end_time"]
    if result.get("world_size", world) != world:  # e.g. HF under torchrun on a CPU: each rank trains alone
        raise RuntimeError(f"{contender} saw a world of {result['world_size']} in a {world}-rank launch")
    if len(times) < args.warmup_steps + 3:
        raise RuntimeError(f"{contender}: {len(times)} steps, too few for --warmup-steps {args.warmup_steps}")
    global_batch = args.batch_size * world
    steps = [b - a for a, b in itertools.pairwise(times)]
    skip = args.warmup_steps
    return {
        "samples_per_s": (len(times) - 1 - skip) * global_batch / (times[-1] - times[skip]),
        "samples_per_s_median_step": global_batch / max(statistics.median(steps[skip:]), 1e-3),
        "steps": len(times), "launch_wall_s": wall, "time_to_first_step_s": times[0] - started,
        "step_time_s": [round(t, 4) for t in steps],
        **{k: v for k, v in result.items() if k not in ("step_end_time", "finished")},
    }  # fmt: skip


# SD v1.4's proportions in GenImage: 512² PNG fakes, ImageNet-like JPEG reals (~500x375, q96), half each
SD_TRAIN, SD_VAL, SD_FAKE_SIDE, SD_QUALITY = 1600, 400, 512, 96


def sd_mix_shards(cache: Path, workers: int = 2) -> Path:
    """The SD v1.4-like shard set (train SD_TRAIN, val SD_VAL distinct images), built once into `cache`."""
    from benchmarks.synthetic_images import write_genimage_tree
    from ds_trainer.data.shards import shard_genimage

    shards = cache / f"vs-hf-sd-t{SD_TRAIN}-v{SD_VAL}-q{SD_QUALITY}"
    if (shards / "manifest.json").is_file():
        return shards
    src = cache / f"{shards.name}-src"
    for partial in (src, shards):  # what an interrupted build left
        shutil.rmtree(partial, ignore_errors=True)
    print(f"writing {SD_TRAIN + SD_VAL} distinct SD v1.4-like images and their shards in {shards}", flush=True)
    for split, n, seed in (("train", SD_TRAIN, 11), ("val", SD_VAL, 12)):  # other seeds: no image in both
        write_genimage_tree(src, "sd", n - n // 2, n // 2, SD_FAKE_SIDE, seed=seed, real_quality=SD_QUALITY,
                            workers=workers, split=split)  # fmt: skip
    shard_genimage(src, shards, max_count=200, workers=workers, progress=False)
    shutil.rmtree(src)
    return shards


def resolve_shards(args: argparse.Namespace) -> tuple[Path, str]:
    """The shard set of the run and how the report describes it: --shards, else --images (sd or demo)."""
    if args.shards is None and args.images == "sd":
        shards = sd_mix_shards(Path(args.cache))
        what = (f"an SD v1.4-like shard set as GenImage's ({SD_FAKE_SIDE}² PNG fakes, ~500x375 JPEG reals at "
                f"q{SD_QUALITY}, distinct generated images, benchmarks/synthetic_images.py)")  # fmt: skip
        return shards, what
    shards = Path(args.shards or "data_shards/demo")
    shards = shards if shards.is_absolute() else REPO / shards
    if not (shards / "manifest.json").exists():
        from ds_trainer.data import make_demo_shards

        print(f"building the demo shard set in {shards} (as `make demo-data`)", flush=True)
        make_demo_shards(shards, progress=False)
    return (
        shards,
        f"the shards in {args.shards or 'data_shards/demo'} (the demo's: 224–256 px JPEG reals and PNG fakes)",
    )


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from benchmarks.step_overhead import small_clip_dir

    args.shards, described = resolve_shards(args)
    raw: dict[int, dict[str, list[dict[str, Any]]]] = {w: {c: [] for c in CONTENDERS} for w in args.world_sizes}
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ds_trainer_vs_hf_defaults_") as tmp:
        work = Path(tmp)
        small_clip_dir(work, args.image_size, args.hidden, args.layers, patch_size=args.patch_size)
        n_images = extract_train_images(args.shards, work / "images")
        for r in range(args.repeats):
            for i, w in enumerate(args.world_sizes):
                for c in CONTENDERS if (r + i) % 2 == 0 else CONTENDERS[::-1]:
                    tag = f"defaults_{c}_w{w}_r{r}"
                    order.append(tag)
                    m = launch(c, w, args, work, tag)
                    raw[w][c].append(m)
                    print(f"  {tag}: {m['samples_per_s']:.1f} samples/s over {m['steps']} steps, "
                          f"launch {m['launch_wall_s']:.1f} s", flush=True)  # fmt: skip
    rows, summary, per_world = [], [], {}
    for w in args.world_sizes:
        ds, hf = raw[w]["ds_trainer"], raw[w]["hf"]
        ratios = [d["samples_per_s"] / h["samples_per_s"] for d, h in zip(ds, hf)]
        median_ratios = [d["samples_per_s_median_step"] / h["samples_per_s_median_step"] for d, h in zip(ds, hf)]
        rate = {c: spread([m["samples_per_s"] for m in raw[w][c]]) for c in CONTENDERS}
        per_world[str(w)] = {"samples_per_s": rate, "ratio": spread(ratios), "ratio_median_step": spread(median_ratios),
                             "meets_1_2x": spread(ratios)["median"] >= 1.2}  # fmt: skip
        wait = {c: spread([m["data_wait_fraction"] for m in raw[w][c]]) for c in CONTENDERS}
        per_world[str(w)]["data_wait_fraction"] = wait
        rows.append([w, fmt_spread(rate["ds_trainer"], 1), fmt_spread(rate["hf"], 1), fmt_spread(spread(ratios)),
                     fmt_spread(spread(median_ratios)), fmt_spread(wait["ds_trainer"], 2), fmt_spread(wait["hf"], 2),
                     hf[-1].get("torch_threads")])  # fmt: skip
        summary.append(f"{w} rank{'s' if w > 1 else ''}: ds_trainer/HF samples/s {fmt_spread(spread(ratios))}")
    table = md_table(["world size", "ds_trainer samples/s", "HF samples/s", "ratio ds_trainer/HF",
                      "ratio, median steps", "ds_trainer data wait", "HF data wait", "HF torch threads"],
                     rows)  # fmt: skip
    markdown = (
        f"{table}\n\nEach tool as its docs show, on {described}: {n_images} training images, decoded and "
        f"CLIP-preprocessed by both. ds_trainer through `./launch.sh --config` with "
        f"its YAML defaults and the streaming loader; HF's `Trainer` with a map-style Dataset decoding in "
        f"`__getitem__` and default `TrainingArguments` (`use_cpu=True` without CUDA: HF's DDP over gloo). Only batch {args.batch_size}/rank, {args.epochs} epoch(s) "
        f"and LR {args.lr:g} set equal (plus the model: a random-init CLIP tower, {args.hidden} wide, {args.layers} "
        f"layers, patch {args.patch_size}, {args.image_size} px). samples/s is steady state (after step "
        f"{args.warmup_steps}), median (range) of {args.repeats} alternated launches; target ≥ 1.2×. Data wait: "
        f"the share of the time the training step waited for its batch (ds_trainer: its epochs' "
        f"`data_wait_fraction`; HF: from each step's end to the next one's begin, where its loop decodes the "
        f"batch, after step {args.warmup_steps})."
    )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_result("vs_hf_trainer_defaults", args.out, argv, "; ".join(summary), markdown,
                 settings={**settings, "order": order, "train_images": n_images}, per_world_size=per_world,
                 raw={str(w): raw[w] for w in args.world_sizes})  # fmt: skip
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--defaults run")
    g.add_argument("--defaults", action="store_true", help="each tool at its documented defaults, on real shards")
    g.add_argument("--images", choices=("sd", "demo"), default="sd",
                   help="--defaults: an SD v1.4-like set (512² PNG fakes, JPEG reals; built once into --cache) "
                   "or the demo shards")  # fmt: skip
    g.add_argument("--shards", default=None, help="--defaults: a shard set of your own (the demo's built when absent)")
    g.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ds_trainer_bench"),
                   help="--defaults: where the SD-like set is kept between runs")  # fmt: skip
    g.add_argument("--epochs", type=int, default=1, help="--defaults: epochs (both)")
    g.add_argument("--lr", type=float, default=1e-4, help="--defaults: learning rate (both)")
    g.add_argument("--patch-size", type=int, default=None, help="patch of the CLIP tower (16; --defaults: 32)")
