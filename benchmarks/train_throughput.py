"""Does the loader keep up with training? A real epoch on real shards: samples/s, the loader alone, the data wait.

For each shard set -- the demo set (data_shards/demo, built with `make demo-data` when absent) and
synthetic GenImage-like sets at 128², 256², 512², 1024² in JPEG (like GenImage's reals) and PNG
(like its fakes), written with data_throughput.py's writer -- this builds a Config (model `tiny`,
224 px, batch 16, fp32, ZeRO 1, `data.num_workers` = --workers, everything else the defaults),
takes the train loader from `ds_trainer.run.build_loaders` (as `ds-trainer train` does) and trains
`ds_trainer.Trainer` for one epoch of --steps batches (the demo set's epoch cut to as many). From
the epoch's metrics row it reports `samples_per_s`, `data_wait_s` (time the training loop spent
blocked in next(loader)) and `data_wait_fraction` (= data_wait_s / epoch_time_s). It also times
the epoch's first batch (worker start-up and the first decodes, paid once per epoch), so the
steady-state wait of a long epoch is (data_wait_s - first) / (epoch_time_s - first). Then a fresh
loader of the same config is iterated alone and its steady-state images/s timed
(data_throughput.steady_rate).

The target: wait < 5 % of step time at the configured worker count. Where the loader does not
keep up, `workers needed` = the step rate without waiting, samples / (epoch_time_s - data_wait_s),
over the loader's images/s per worker. On this CPU machine the model step and the loader workers
share the same cores, so the per-worker rate during training is lower than alone. The Trainer gives
the step the cores the workers leave (`distributed.reserve_cpu_threads`): with torch's threads on
every core, OpenMP threads spin against a busy worker, and the tiny model's step measured 10-20x
slower here (shared machine). --threads N overrides that (as OMP_NUM_THREADS would).

    python benchmarks/train_throughput.py                       # about 3 minutes on 2 busy cores
    python benchmarks/train_throughput.py --sizes 256,1024 --formats png --workers 2 --no-demo
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never waits for a download

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, md_table, spread, write_result
from benchmarks.data_throughput import steady_rate, write_tree
from ds_trainer.config import Config

TARGET = 0.05  # the bar: the training loop waits for data under 5 % of the time


class ShortEpoch:
    """The train loader as the Trainer sees it, cut to its first `steps` batches, timing the first one's arrival."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader = loader
        self.steps = min(steps, len(loader))
        self.first_s = math.nan

    def __len__(self) -> int:
        return self.steps

    def __getattr__(self, name: str) -> Any:  # batch_size, set_epoch, state_dict, ...
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        start = time.perf_counter()
        first = next(it, None)
        self.first_s = time.perf_counter() - start
        if first is None:
            return
        yield first
        for _, batch in zip(range(self.steps - 1), it):
            yield batch


def bench_config(shards: Path, generators: list[str] | None, args: argparse.Namespace, work: Path) -> Config:
    return Config(
        name="train_throughput",
        model={"model_name": args.model},
        data={"shards": str(shards), "train_generators": generators, "val_split": None, "image_size": args.image_size,
              "num_workers": args.workers},
        training={"batch_size": args.batch_size, "num_epochs": 1, "warmup_epochs": 0, "mixed_precision": False,
                  "checkpoint_dir": str(work / "ckpt"), "save_frequency": 0, "monitor": "train_loss"},
        deepspeed={"zero_stage": args.zero_stage, "precision": "fp32"},
        logging={"run_dir": str(work / "run"), "tensorboard": False, "progress_bar": "off", "mfu": False,
                 "log_every_n_steps": 1000},
    )  # fmt: skip


def measure(name: str, image: str, cfg: Config, steps: int, threads: int = 0) -> dict[str, Any]:
    """Train one epoch of `steps` batches on cfg's shards, then time the same loader alone.

    `threads`: torch threads for the step (0: the Trainer's choice, the cores the loader workers leave).
    """
    from ds_trainer.distributed import init_distributed
    from ds_trainer.models import build_model
    from ds_trainer.run import build_loaders, seed_everything
    from ds_trainer.trainer import Trainer

    env = init_distributed()
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the Trainer leaves an explicit choice alone
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    train_loader, _ = build_loaders(cfg, env, train=True)
    clock = ShortEpoch(train_loader, steps)
    (row,) = Trainer(build_model(cfg.model), clock, None, config=cfg).train()
    for key in ("data_wait_s", "data_wait_fraction"):
        if key not in row:
            raise SystemExit(f"the Trainer's epoch row has no {key!r}: this ds_trainer predates the data-wait metric")

    loader, _ = build_loaders(cfg, env, train=True)
    loader.set_epoch(1)  # the batches the epoch trained on
    warm = max(loader.plan().num_workers, 1)
    alone, workers = steady_rate(loader, clock.steps - warm)

    epoch_s, wait_s, first_s = row["epoch_time_s"], row["data_wait_s"], clock.first_s
    samples = row["samples_per_s"] * epoch_s
    steady_wait = max(wait_s - first_s, 0.0) / (epoch_s - first_s)
    step_rate = samples / (epoch_s - wait_s)  # the loop's rate were the data always there
    per_worker = alone / max(workers, 1)
    keeps_up = steady_wait < TARGET
    needed = max(workers, math.ceil(step_rate / per_worker))
    # Alone the loader would have fed the step; in training it waits anyway: the step and the workers share cores.
    limited_by = None if keeps_up else ("shared cores" if alone >= step_rate else "loader")
    return {
        "set": name, "image": image, "steps": clock.steps, "workers": workers,
        "samples_per_s": row["samples_per_s"], "epoch_time_s": epoch_s, "data_wait_s": wait_s,
        "data_wait_fraction": row["data_wait_fraction"], "first_batch_s": first_s, "steady_wait_fraction": steady_wait,
        "step_rate_no_wait": step_rate, "loader_alone_img_s": alone, "loader_img_s_per_worker": per_worker,
        "keeps_up": keeps_up, "workers_needed": needed, "limited_by": limited_by,
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> str:
    return md_table(
        ["shard set", "image", "steps", "train samples/s", "step rate w/o wait", "loader alone img/s",
         "wait (epoch)", "first batch s", "wait (steady)", "keeps up (< 5 %)", "workers needed"],
        [[r["set"], r["image"], r["steps"], f"{r['samples_per_s']:.1f}", f"{r['step_rate_no_wait']:.1f}",
          f"{r['loader_alone_img_s']:.1f}", f"{100 * r['data_wait_fraction']:.1f} %", f"{r['first_batch_s']:.2f}",
          f"{100 * r['steady_wait_fraction']:.1f} %", "yes" if r["keeps_up"] else f"**no** ({r['limited_by']})",
          r["workers_needed"]] for r in rows],
    )  # fmt: skip


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sizes", default="128,256,512,1024", help="synthetic sets: square image sides, comma-separated")
    p.add_argument("--formats", default="jpeg,png", help="synthetic sets: jpeg (GenImage reals), png (fakes)")
    p.add_argument("--workers", type=int, default=1, help="data.num_workers (default 1: this machine has 2 cores)")
    p.add_argument(
        "--steps",
        "--batches",
        dest="steps",
        type=int,
        default=16,
        help="train steps (batches) per epoch; the demo set's epoch is cut to its first --steps batches",
    )
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=True, help="also the demo shard set")
    p.add_argument("--demo-dir", default="data_shards/demo", help="the demo set (built here when absent)")
    p.add_argument("--model", default="tiny", help="model.model_name: 'tiny' or a local CLIP (hub id or directory)")
    p.add_argument("--image-size", type=int, default=224, help="data.image_size (the model's input size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1))
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the step (default 0: the Trainer's choice, the cores the loader workers "
        "leave, at least 1)",
    )
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/train_throughput.json)")
    args = p.parse_args(argv)
    if args.steps < max(args.workers, 1) + 2:
        p.error(f"--steps must be at least workers + 2 ({max(args.workers, 1) + 2}): the loader alone is timed after "
                "every worker's first batch")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ds_trainer_train_throughput_") as tmp:
        work = Path(tmp)
        if args.demo:
            demo = Path(args.demo_dir) if Path(args.demo_dir).is_absolute() else REPO / args.demo_dir
            if not (demo / "manifest.json").exists():
                from ds_trainer.data import make_demo_shards

                print(f"building the demo shard set in {demo} (as `make demo-data`)")
                make_demo_shards(demo, progress=False)
            cfg = bench_config(demo, None, args, work / "demo")
            rows.append(measure("demo", "demo", cfg, args.steps, args.threads))
            print(_table(rows[-1:]).splitlines()[-1])
        if sizes and formats:
            per_set = args.steps * args.batch_size
            t0 = time.perf_counter()
            write_tree(work / "src", work / "shards", sizes, formats, per_set, args.workers)
            print(f"wrote {len(sizes) * len(formats)} synthetic shard sets of {per_set} images in "
                  f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
            for size in sizes:
                for fmt in formats:
                    gen = f"{fmt}{size}"
                    cfg = bench_config(work / "shards", [gen], args, work / gen)
                    rows.append(measure(gen, f"{size}² {fmt}", cfg, args.steps, args.threads))
                    print(_table(rows[-1:]).splitlines()[-1])
    if not rows:
        raise SystemExit("nothing to measure: give --sizes and --formats, or --demo")
    _write(args, argv, rows, time.perf_counter() - start)


def _write(args: argparse.Namespace, argv: list[str] | None, rows: list[dict[str, Any]], wall_s: float) -> None:
    threads = torch.get_num_threads()
    table = _table(rows)
    print(f"\n{table}\n")
    ok = [r for r in rows if r["keeps_up"]]
    waits = spread([r["steady_wait_fraction"] for r in rows])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    cpu_note = (
        f" On this CPU the model step ({threads} torch thread(s), the cores the workers leave) and the "
        f"{args.workers} loader worker(s) share {os.cpu_count()} cores, so a row's verdict is for this machine; "
        "`no (shared cores)` marks a row whose loader alone would feed the step. On a GPU the step is far faster "
        "and needs proportionally more workers."
        if not torch.cuda.is_available()
        else ""
    )
    markdown = (
        f"{table}\n\nOne epoch of `ds_trainer.Trainer` per shard set ({device}; model `{args.model}`, "
        f"{args.image_size} px, batch {args.batch_size}, fp32, ZeRO {args.zero_stage}, data.num_workers "
        f"{args.workers}; {args.steps} steps, the demo set's first {args.steps}): `train samples/s` and "
        "`wait (epoch)` (data_wait_fraction) come from the epoch's metrics row; `wait (steady)` leaves out the first "
        "batch (worker start-up, paid once per epoch), which weighs heavily in epochs this short; `keeps up` is "
        "steady wait < 5 %; `workers needed` = step rate without waiting / loader-alone rate per worker, rounded "
        f"up.{cpu_note} One run on a shared machine: absolute rates are for scale only."
    )
    lo, mid, hi = (100 * waits[k] for k in ("min", "median", "max"))
    summary = (
        f"at {args.workers} worker(s) the loader keeps up (steady data wait < 5 %) in {len(ok)} of {len(rows)} "
        f"shard sets; steady wait {mid:.0f} % median ({lo:.0f}-{hi:.0f} %), "
        f"{args.model} on {'GPU' if torch.cuda.is_available() else 'CPU'}"
    )
    settings = {k: getattr(args, k) for k in ("workers", "steps", "demo", "model", "image_size", "batch_size",
                                              "zero_stage", "threads")}  # fmt: skip
    settings.update(sizes=[int(s) for s in args.sizes.split(",") if s.strip()],
                    formats=[f.strip() for f in args.formats.split(",") if f.strip()], precision="fp32",
                    torch_threads=threads, target_wait_fraction=TARGET)  # fmt: skip
    write_result("train_throughput", args.out, argv, summary, markdown, settings=settings, rows=rows,
                 steady_wait_fraction=waits, wall_s=wall_s)  # fmt: skip


if __name__ == "__main__":
    main()
