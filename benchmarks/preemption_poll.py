"""What the preemption poll costs per step at 2+ ranks: its all-reduce and `.item()`, A/B.

After every optimizer step the ranks all-reduce one int32 (MAX) over gloo and read it back
(`ds_trainer/preemption.py`, hook `PreemptionPoll`) so that all of them stop at the same step.
This launches vs_hf_trainer.py's ds_trainer worker (same model, in-memory tensors, deepspeed
launcher) with the poll as shipped ("on": asynchronous, read one step later), as it was ("sync":
blocking all-reduce and .item() each step) and kept on each rank ("off": no collective, so no
guarantee; the A/B baseline only), alternating, and reports:

  step time:    rank 0's median steady step (after --warmup-steps), per arm; ratio to off per repeat
  poll time:    the wall time of the poll call itself, mean over the steady steps, and its share of
                the step (an upper bound: it includes waiting for the slower rank, which the next
                collective would pay otherwise)

    python benchmarks/preemption_poll.py                  # ~2 minutes on 2 cores
    python benchmarks/preemption_poll.py --world-size 2 --repeats 4 --steps 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import fmt_spread, md_table, spread, write_result
from benchmarks.step_overhead import make_batches, small_clip_dir
from benchmarks.vs_hf_trainer import launch

ARMS = ("sync", "on", "off")
THRESHOLD = 0.01  # the poll is worth making cheaper when it costs more than 1 % of a step


def steady(values: list[float], skip: int) -> list[float]:
    return values[skip:] if len(values) > skip + 1 else values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="launches per arm")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    # Small by default: a short step, as on a GPU, where a fixed per-step cost shows.
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--launch-timeout", type=int, default=600)
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/preemption_poll.json)")
    args = p.parse_args(argv)
    if args.world_size < 2 or args.steps < args.warmup_steps + 3 or args.repeats < 1:
        p.error("need --world-size >= 2 (the poll is local at 1 rank), --steps >= warmup + 3, --repeats >= 1")

    raw: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    order = []
    with tempfile.TemporaryDirectory(prefix="ds_trainer_preemption_poll_") as tmp:
        work = Path(tmp)
        small_clip_dir(work, args.image_size, args.hidden, args.layers)
        batches = make_batches(args.steps * args.world_size, args.batch_size, args.image_size)
        torch.save({"pixel_values": torch.cat([x for x, _ in batches]), "labels": torch.cat([y for _, y in batches])},
                   work / "data.pt")  # fmt: skip
        del batches
        for r in range(args.repeats):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:  # sync on off, off on sync, ...
                tag = f"poll_{arm}_r{r}"
                order.append(tag)
                m = launch("ds_trainer", args.world_size, args, work, tag, ("--preemption-poll", arm))
                skip = args.warmup_steps
                m["median_step_s"] = statistics.median(steady(m["step_time_s"], skip))
                m["poll_mean_s"] = statistics.fmean(steady(m["poll_s"], skip))
                raw[arm].append(m)
                print(f"  {tag}: median step {1e3 * m['median_step_s']:.1f} ms, poll {1e6 * m['poll_mean_s']:.0f} µs",
                      flush=True)  # fmt: skip
    step = {a: spread([m["median_step_s"] for m in raw[a]]) for a in ARMS}
    poll = {a: spread([m["poll_mean_s"] for m in raw[a]]) for a in ARMS}
    ratio = spread([on["median_step_s"] / off["median_step_s"] for on, off in zip(raw["on"], raw["off"])])
    sync_ratio = spread([a["median_step_s"] / b["median_step_s"] for a, b in zip(raw["sync"], raw["off"])])
    share = spread([m["poll_mean_s"] / m["median_step_s"] for m in raw["on"]])
    sync_share = spread([m["poll_mean_s"] / m["median_step_s"] for m in raw["sync"]])
    rows = [[a, fmt_spread({k: 1e3 * v if k != "n" else v for k, v in step[a].items()}, 1),
             fmt_spread({k: 1e6 * v if k != "n" else v for k, v in poll[a].items()}, 0)] for a in ARMS]  # fmt: skip
    table = md_table(["poll", "median step (ms)", "poll call (µs, mean)"], rows)
    shows = share["median"] > THRESHOLD
    summary = (f"{args.world_size} ranks: the poll call {100 * sync_share['median']:.2f} % of a step blocking (before), "
               f"{100 * share['median']:.2f} % asynchronous (now, {'above' if shows else 'below'} the 1 % bar); "
               f"step time vs no poll: {fmt_spread(sync_ratio)} before, {fmt_spread(ratio)} now")  # fmt: skip
    markdown = (
        f"{table}\n\nThe preemption poll (one int32 all-reduce MAX over gloo and its `.item()` after each optimizer "
        f"step): sync = blocking, as it was; on = as shipped, the all-reduce started after step k is read after step "
        f"k+1; off = kept on each rank (no collective, no guarantee: the A/B baseline only). Alternated, "
        f"{args.repeats} launches each of `deepspeed --num_gpus {args.world_size}` with vs_hf_trainer.py's ds_trainer "
        f"worker ({args.hidden} wide, {args.layers} layers, {args.image_size} px, batch {args.batch_size}/rank, "
        f"{args.steps} steps, ZeRO {args.zero_stage}). Step time ratio vs off: sync {fmt_spread(sync_ratio)}, on "
        f"{fmt_spread(ratio)}; the poll call itself, share of the median step: sync {100 * sync_share['median']:.2f} % "
        f"({100 * sync_share['min']:.2f}–{100 * sync_share['max']:.2f} %), on {100 * share['median']:.2f} % "
        f"({100 * share['min']:.2f}–{100 * share['max']:.2f} %); an upper bound (it includes waiting for the slower "
        f"rank)."
    )
    write_result("preemption_poll", args.out, argv, summary, markdown, settings={**vars(args), "order": order},
                 step_s=step, poll_s=poll, ratio_on_over_off=ratio, ratio_sync_over_off=sync_ratio,
                 poll_share_of_step=share, sync_poll_share_of_step=sync_share, above_1_percent=shows,
                 raw={a: [{k: v for k, v in m.items() if k != "ds_config"} for m in raw[a]] for a in ARMS})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
