"""Weak scaling of ds_trainer.Trainer over ranks at a fixed per-rank batch, and the bytes it communicates.

Each world size is one job through the real `deepspeed` launcher (benchmarks/workers/rank_worker.py):
every rank trains `ds_trainer.Trainer` on the same pre-loaded batches (the data loader is not measured;
a random-init CLIP vision tower + head, fp32, ZeRO stage 1 by default) for a warm-up epoch, `--epochs`
timed epochs (the Trainer's `epoch_time_s`: steps only, no checkpoint) and one more epoch with
DeepSpeed's comms logger on, which counts the collectives and their message sizes.

  rate(N)       = N x batch x steps / epoch time (the slowest rank), median over the timed epochs
  efficiency(N) = rate(N) / (N x rate(1)), paired within one repeat (the world sizes alternate)
  volume        = bytes each rank sends per optimizer step if every logged collective ran as a ring:
                  all-reduce 2(N-1)/N x size, reduce-scatter (N-1)/N x input, all-gather (N-1) x shard
  theory        = 2(N-1)/N x gradient bytes (ring all-reduce of the gradients; the textbook ZeRO 2, a
                  reduce-scatter plus the all-gather of the updated parameters, moves the same; DeepSpeed
                  0.19's ZeRO 1/2 measure 1.5x that: they all-reduce whole buckets, then all-gather)

On a CPU each rank gets `--threads` torch threads (OMP_NUM_THREADS, default 1), so N ranks use N cores.

    python benchmarks/scaling.py                          # about 3 minutes on 2 cores (4 jobs)
    python benchmarks/scaling.py --world-sizes 1,2,4,8    # a GPU node (or --max-ranks 8)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never waits for a download

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt_spread, md_table, spread, write_result
from step_overhead import build_model, small_clip_dir
from workers.rank_worker import launch

MiB = 2**20


def ring_factor(op: str, n: int) -> float | None:
    """Bytes a rank sends per logged byte of `op` when it runs as a ring; None for an op not known here.

    The comms logger records the input tensor's size: the whole tensor for all-reduce and reduce-scatter,
    the rank's shard for all-gather (deepspeed/comm/utils.py get_msg_size_from_args).
    """
    if op in ("all_reduce", "all_reduce_coalesced", "inference_all_reduce"):
        return 2 * (n - 1) / n
    if op in ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_fn", "broadcast", "reduce"):
        return (n - 1) / n
    if op in ("all_gather", "all_gather_into_tensor", "allgather_fn"):
        return float(n - 1)
    if op in ("barrier", "log_summary_barrier"):
        return 0.0
    return None


def comm_volume(comms: dict[str, dict[str, int]], n: int, steps: int, total_ms: dict[str, float] | None = None,
                epoch_time_s: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Per optimizer step and rank: logged bytes and ring bytes, per op and in total; time in the collectives."""
    total_ms = total_ms or {}
    per_op: dict[str, Any] = {}
    ring_total, logged_total, unknown = 0.0, 0.0, []
    for op, sizes in comms.items():
        logged = sum(int(size) * count for size, count in sizes.items()) / steps
        calls = sum(sizes.values()) / steps
        factor = ring_factor(op, n)
        if factor is None:
            unknown.append(op)
        ring = logged * factor if factor is not None else None
        per_op[op] = {"calls_per_step": calls, "logged_bytes_per_step": logged, "ring_bytes_per_step": ring,
                      "ms_per_step": total_ms.get(op, 0.0) / steps,
                      "message_sizes": dict(sorted(sizes.items(), key=lambda kv: -int(kv[0])))}  # fmt: skip
        logged_total += logged
        ring_total += ring or 0.0
    comm_ms = sum(total_ms.values()) / steps
    step_ms = 1000 * epoch_time_s / steps if epoch_time_s else None
    return {"per_op": per_op, "logged_bytes_per_step": logged_total, "ring_bytes_per_step": ring_total,
            "unclassified_ops": unknown, "collective_ms_per_step": comm_ms, "step_ms_with_logger": step_ms,
            "collective_share_of_step": comm_ms / step_ms if step_ms else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--world-sizes", default="1,2", help="comma-separated rank counts; the first is the reference")
    p.add_argument(
        "--max-ranks", type=int, default=None, help="shorthand: 1, 2, 4, ... up to this (overrides --world-sizes)"
    )
    p.add_argument("--repeats", type=int, default=2, help="rounds over the world sizes (their order alternates)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per job; the first is warm-up, the others timed")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per epoch")
    p.add_argument("--batch-size", type=int, default=16, help="per rank (fixed: weak scaling)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256, help="width of the random-init CLIP vision tower")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (OMP_NUM_THREADS)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/scaling.json)")
    args = p.parse_args(argv)
    if args.max_ranks is not None:
        sizes = [1]
        while sizes[-1] * 2 <= args.max_ranks:
            sizes.append(sizes[-1] * 2)
        if sizes[-1] != args.max_ranks:
            sizes.append(args.max_ranks)
    else:
        sizes = [int(s) for s in args.world_sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        p.error(f"world sizes must be distinct positive integers, got {sizes}")
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is warm-up)")

    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu
    if on_gpu and max(sizes) > torch.cuda.device_count():
        p.error(f"world size {max(sizes)} needs {max(sizes)} GPUs; {torch.cuda.device_count()} visible")
    cores = os.cpu_count() or 1
    start = time.perf_counter()
    jobs: list[dict[str, Any]] = []
    rates: dict[int, list[float | None]] = {n: [] for n in sizes}
    comms: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ds_trainer_scaling_") as tmp:
        work = Path(tmp)
        model_dir = small_clip_dir(work, args.image_size, args.hidden, args.layers)
        n_params = sum(q.numel() for q in build_model(model_dir).parameters() if q.requires_grad)
        worker_args = ["--model-dir", str(model_dir), "--image-size", str(args.image_size), "--batch-size",
                       str(args.batch_size), "--steps", str(args.steps), "--epochs", str(args.epochs), "--zero-stage",
                       str(args.zero_stage), "--precision", args.precision, "--comms", *([] if on_gpu else ["--cpu"])]  # fmt: skip
        for r in range(args.repeats):
            order = sizes[r % len(sizes) :] + sizes[: r % len(sizes)] if r % 2 == 0 else list(reversed(sizes))
            for n in order:
                t0 = time.perf_counter()
                ranks, log = launch(n, worker_args, work / f"job-{r}-{n}", timeout_s=args.timeout,
                                    threads_per_rank=args.threads)  # fmt: skip
                job: dict[str, Any] = {"repeat": r, "world_size": n, "job_s": time.perf_counter() - t0}
                if ranks is None:
                    job["error"] = log
                    rates[n].append(None)
                    print(f"scaling: {n} ranks (repeat {r}) failed:\n{log}", file=sys.stderr)
                else:
                    # Rank r's i-th epoch: all ranks run the same steps in lockstep; the slowest sets the pace.
                    epoch_times = [max(t) for t in zip(*(x["epoch_time_s"] for x in ranks))][1:]
                    samples = n * args.batch_size * args.steps
                    job.update(epoch_time_s=epoch_times, samples_per_s=[samples / t for t in epoch_times],
                               torch_threads=[x["torch_threads"] for x in ranks], device=ranks[0]["device"])  # fmt: skip
                    rates[n].append(statistics.median(job["samples_per_s"]))
                    if n not in comms:
                        comm_epoch = max(x["comm_epoch_time_s"] for x in ranks)
                        comms[n] = comm_volume(ranks[0]["comms"], n, args.steps, ranks[0]["comms_total_ms"], comm_epoch)
                jobs.append(job)
    ref = sizes[0]
    grad_bytes = (4 if args.precision == "fp32" else 2) * n_params
    results: dict[str, Any] = {}
    table = []
    for n in sizes:
        ok = [x for x in rates[n] if x is not None]
        entry: dict[str, Any] = {"samples_per_s": spread(ok) if ok else None}
        eff = [x / (n / ref * y) for x, y in zip(rates[n], rates[ref]) if x is not None and y is not None]
        entry["efficiency"] = spread(eff) if eff else None
        theory = 2 * (n - 1) / n * grad_bytes
        vol = comms.get(n)
        entry["comm"] = vol
        entry["theory_ring_bytes_per_step"] = theory
        entry["ring_over_theory"] = vol["ring_bytes_per_step"] / theory if vol and theory else None
        results[str(n)] = entry
        ops = ", ".join(f"{op} {v['calls_per_step']:g}×/step {v['logged_bytes_per_step'] / MiB:.2f} MiB"
                        for op, v in vol["per_op"].items()) if vol else "—"  # fmt: skip
        table.append([
            n, fmt_spread(entry["samples_per_s"], 1) if ok else "failed",
            fmt_spread(entry["efficiency"], 3) if eff else "—",
            f"{vol['ring_bytes_per_step'] / MiB:.2f}" if vol else "—", f"{theory / MiB:.2f}",
            f"{entry['ring_over_theory']:.2f}" if entry["ring_over_theory"] is not None else "—", ops,
            f"{vol['collective_ms_per_step']:.0f} of {vol['step_ms_with_logger']:.0f} "
            f"({100 * vol['collective_share_of_step']:.0f} %)" if vol and vol["step_ms_with_logger"] else "—",
        ])  # fmt: skip
    columns = ["ranks", "samples/s (median, range)", f"efficiency vs {ref} rank(s)", "ring MiB/rank/step (measured)",
               "theory 2(N-1)/N × grads MiB", "measured / theory", "logged collectives (per step, message bytes)",
               "ms/step in collectives, rank 0 (of the step)"]  # fmt: skip
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({cores} cores)"
    oversub = not on_gpu and max(sizes) * args.threads > cores
    markdown = (
        md_table(columns, table) + "\n\n"
        f"Weak scaling on {device}: `ds_trainer.Trainer` on pre-loaded batches, {args.batch_size} per rank, random-init "
        f"CLIP vision tower + head ({n_params / 1e6:.1f} M parameters, hidden {args.hidden}, {args.layers} layers, "
        f"{args.image_size} px), ZeRO {args.zero_stage}, {args.precision}, {args.threads} torch thread(s) per rank"
        + (f" (OMP_NUM_THREADS={args.threads}: {max(sizes)} ranks use {max(sizes) * args.threads} of the {cores} cores"
           + (", oversubscribed" if oversub else "") + ")" if not on_gpu else "")
        + f"; {args.repeats} repeats alternating the world sizes, {args.epochs - 1} timed epochs of {args.steps} steps "
        "per job. Volume: the collectives DeepSpeed's comms logger saw in one extra epoch (logger off while timing), "
        "as bytes per rank if each ran as a ring"
        + ("; DeepSpeed 0.19's ZeRO 1/2 reduce the gradients with an all-reduce of whole buckets (ZeRO 2: "
           "`use_multi_rank_bucket_allreduce`, on by default), not the textbook reduce-scatter, then all-gather the "
           "updated parameter shards: 3(N-1)/N × grads, 1.5× the ring all-reduce" if args.zero_stage in (1, 2) else "")
        + "; tiny all-reduces are the gradient-norm/overflow checks. The time in collectives (the logger's timers, "
        "waiting for the slower rank included) is from that epoch."
        + (" The machine is shared: absolute rates are for scale only." if not on_gpu else "")
    )  # fmt: skip
    top = sizes[-1]
    top_eff = results[str(top)]["efficiency"]
    summary = ", ".join(
        f"{n} rank(s) {results[str(n)]['samples_per_s']['median']:.1f} samples/s" for n in sizes if results[str(n)]["samples_per_s"]
    )  # fmt: skip
    if top_eff and top != ref:
        summary += f"; efficiency {ref}→{top} ranks {fmt_spread(top_eff, 3)}"
    vol = comms.get(top)
    if vol and results[str(top)]["ring_over_theory"] is not None:
        summary += (f"; {vol['ring_bytes_per_step'] / MiB:.1f} MiB/rank/step at {top} ranks = "
                    f"{results[str(top)]['ring_over_theory']:.2f}× ring all-reduce theory")  # fmt: skip
    summary += f"; {n_params / 1e6:.1f} M params, ZeRO {args.zero_stage}, {args.repeats} repeats"
    write_result("scaling", args.out, argv, summary, markdown,
                 settings={**vars(args), "world_sizes": sizes, "parameters": n_params,
                           "device": "cuda" if on_gpu else "cpu", "cpus": cores, "oversubscribed": oversub},
                 results=results, jobs=jobs, wall_s=time.perf_counter() - start)  # fmt: skip
    return 0 if all(j.get("error") is None for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
