"""Peak memory per rank for each ZeRO stage, measured on 2 real ranks, beside the textbook theory.

Each configuration (ZeRO 0, 1, 2, 3 and ZeRO 2 with `deepspeed.offload_optimizer: cpu`) is one job of
`--ranks` ranks through the real `deepspeed` launcher (benchmarks/workers/rank_worker.py), each rank
training `ds_trainer.Trainer` on a random-init CLIP vision tower + head (built from a config, no
download) for a few optimizer steps on pre-loaded batches, fp32. Per rank:

  CPU: peak RSS (ru_maxrss) minus the RSS right before the model is built (both reported)
  GPU: torch.cuda.max_memory_allocated

Theory from the parameter count P and the world size N, fp32: params 4P, grads 4P, Adam moments 8P
(no master copy); bf16: params 2P, grads 2P, master 4P + moments 8P. ZeRO 1 divides the optimizer
states by N, ZeRO 2 also the gradients, ZeRO 3 also the parameters; offload moves the optimizer
states to host memory, which on a CPU machine is the same RSS.

To explain the gap between the two, each rank also reports the peak of the set-up (model build,
deepspeed.initialize) apart from the steps', the live tensors right before the last optimizer step
by owner (Adam state, parameters, .grad, each DeepSpeed optimizer attribute; resident pages only),
and its RSS after the steps before and after glibc's malloc_trim (memory freed but kept by the allocator).

    python benchmarks/zero_memory.py                      # about 4 minutes on 2 cores (5 jobs of 30-55 s)
    python benchmarks/zero_memory.py --configs 0,3 --hidden 512 --layers 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never waits for a download

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import md_table, write_result
from step_overhead import build_model, small_clip_dir
from workers.rank_worker import launch

MiB = 2**20
CONFIGS = {"0": (0, "none"), "1": (1, "none"), "2": (2, "none"), "3": (3, "none"), "2-offload": (2, "cpu")}


def theory_bytes(p: int, n: int, stage: int, offload: str, precision: str) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and optimizer states (ZeRO paper, Rajbhandari et al. 2020)."""
    width = 4 if precision == "fp32" else 2
    params, grads = width * p, width * p
    optim = 8 * p + (0 if precision == "fp32" else 4 * p)  # Adam moments (+ the fp32 master copy)
    if stage >= 1:
        optim /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        params /= n
    device = params + grads + (0 if offload == "cpu" else optim)
    host = optim if offload == "cpu" else 0.0
    return {"params": params, "grads": grads, "optimizer": optim, "device": device, "host": host,
            "total": device + host}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--configs", default="0,1,2,3,2-offload", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=640, help="width of the random-init CLIP vision tower")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="per rank (small: activations stay small)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (optimizer state appears at the first)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/zero_memory.json)")
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")

    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ds_trainer_zero_memory_") as tmp:
        work = Path(tmp)
        model_dir = small_clip_dir(work, args.image_size, args.hidden, args.layers)
        n_params = sum(q.numel() for q in build_model(model_dir).parameters())
        for name in configs:
            stage, offload = CONFIGS[name]
            worker_args = ["--model-dir", str(model_dir), "--image-size", str(args.image_size), "--batch-size",
                           str(args.batch_size), "--steps", str(args.steps), "--epochs", "1", "--zero-stage", str(stage),
                           "--offload-optimizer", offload, "--precision", args.precision,
                           "--tensors", *([] if on_gpu else ["--cpu"])]  # fmt: skip
            t0 = time.perf_counter()
            ranks, log = launch(args.ranks, worker_args, work / f"job-{name}", timeout_s=args.timeout)
            row: dict[str, Any] = {"config": name, "zero_stage": stage, "offload_optimizer": offload,
                                   "job_s": time.perf_counter() - t0}  # fmt: skip
            if ranks is None:
                row["error"] = log
                print(f"zero_memory: config {name} failed:\n{log}", file=sys.stderr)
            else:
                row["ranks"] = [_rank_memory(r, on_gpu) for r in ranks]
            rows.append(row)
    n = args.ranks
    for row in rows:
        theory = theory_bytes(n_params, n, row["zero_stage"], row["offload_optimizer"], args.precision)
        row["theory_bytes"] = theory
        # On a CPU machine device and host are the same RSS; on a GPU only the device part is allocated there.
        row["theory_measured_bytes"] = theory["device"] if on_gpu else theory["total"]
        if "ranks" in row:
            for key in ("measured_bytes", "setup_peak_bytes", "train_peak_bytes", "steady_bytes"):
                row[key] = max(r[key] for r in row["ranks"])
            row["measured_over_theory"] = row["measured_bytes"] / row["theory_measured_bytes"]
            row["tensors"] = _tensor_summary(row["ranks"][0]["tensor_bytes"], on_gpu)
            row["tensors_over_theory"] = row["tensors"]["total"] / row["theory_measured_bytes"]

    what = "torch.cuda.max_memory_allocated" if on_gpu else "peak RSS − RSS before the model"
    table = []
    for row in rows:
        theory = f"{row['theory_measured_bytes'] / MiB:.0f}"
        if "measured_bytes" not in row:
            table.append([row["config"], theory, "failed", "", "", "", ""])
            continue
        t = row["tensors"]
        parts = [f"moments {t['adam_moments'] / MiB:.0f}", f"params {t['model_params'] / MiB:.0f}"]
        parts += [f".grad {t['model_grads'] / MiB:.0f}"] if t["model_grads"] >= MiB else []
        parts += [f"{k} {v / MiB:.0f}" for k, v in t["largest_zero_buffers"]]
        r0 = row["ranks"][0]
        table.append([
            row["config"], theory, " / ".join(f"{r['measured_bytes'] / MiB:.0f}" for r in row["ranks"]),
            f"{row['measured_over_theory']:.2f}",
            f"{t['total'] / MiB:.0f} ({row['tensors_over_theory']:.2f}): " + ", ".join(parts),
            "" if on_gpu else f"{r0['rss_before_kib'] / 1024:.0f} → {r0['peak_rss_kib'] / 1024:.0f} → "
            f"{r0['rss_after_steps_kib'] / 1024:.0f} → {r0['rss_after_trim_kib'] / 1024:.0f}",
        ])  # fmt: skip
    columns = ["ZeRO", "theory MiB/rank", f"peak MiB, rank 0 / 1 ({what})", "peak / theory",
               "live tensors before the last step MiB (/ theory), rank 0",
               "RSS MiB, rank 0: before → peak → after steps → after malloc_trim"]  # fmt: skip
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({os.cpu_count()} cores)"
    setup_peaks = [r for row in rows for r in row.get("ranks", []) if r["setup_peak_bytes"] >= r["train_peak_bytes"]]
    markdown = (
        md_table(columns, table) + "\n\n"
        f"{n} ranks (real `deepspeed` launcher) on {device}, `ds_trainer.Trainer` on a random-init CLIP vision tower "
        f"+ head ({n_params / 1e6:.1f} M parameters: hidden {args.hidden}, {args.layers} layers, {args.image_size} px, "
        f"batch {args.batch_size} per rank), {args.precision}, {args.steps} optimizer steps; peak / theory uses the "
        "larger rank. Theory: params 4P + grads 4P + Adam 8P, divided by N from ZeRO 1 (optimizer), "
        "2 (+grads), 3 (+params); offload moves the optimizer states to the host"
        + (", here the same RSS, so offload cannot save anything on a CPU machine" if not on_gpu else "")
        + ". The peak falls "
        + ("in the training steps in every run" if not setup_peaks else
           f"in the set-up (model build, deepspeed.initialize) in {len(setup_peaks)} rank run(s)")
        + ". Live tensors (each storage once" + ("" if on_gpu else ", resident pages only (mincore)")
        + ") name DeepSpeed's buffers beyond the theory: ZeRO 1/2 keep an fp32 clone of the rank's partition "
        "(`single_partition_of_fp32_groups`) even in fp32 training, offload adds copy-back and gradient buffers, "
        "ZeRO 3 a gradient bucket (`ipg_buckets`, reduce_bucket_size elements allocated, resident where written)"
        + _same_as_stage2(rows) + ". " + _rss_note(rows, on_gpu)
    )  # fmt: skip
    ok = [r for r in rows if "measured_bytes" in r]
    summary = ", ".join(f"ZeRO {r['config']} {r['measured_bytes'] / MiB:.0f} MiB ({r['measured_over_theory']:.2f}× "
                        f"theory, live tensors {r['tensors_over_theory']:.2f}×)" for r in ok) or "no configuration ran"  # fmt: skip
    summary += f"; {n_params / 1e6:.1f} M params, {n} ranks, {'GPU allocated' if on_gpu else 'CPU RSS'}"
    write_result("zero_memory", args.out, argv, summary, markdown,
                 settings={**vars(args), "configs": configs, "parameters": n_params, "world_size": n,
                           "device": "cuda" if on_gpu else "cpu", "measure": what},
                 configs=rows, wall_s=time.perf_counter() - start)  # fmt: skip
    return 0 if len(ok) == len(rows) else 1


def _tensor_summary(by_owner: dict[str, dict[str, int]], on_gpu: bool) -> dict[str, Any]:
    """Bytes by owner: on a GPU the device's, on a CPU the resident part of the host's."""
    key = "cuda" if on_gpu else "cpu_resident"
    on = {k: v.get(key, 0) for k, v in by_owner.items()}
    zero = {k.removeprefix("zero."): v for k, v in on.items() if k.startswith("zero.") and v}
    return {
        "adam_moments": on.get("adam_moments", 0), "model_params": on.get("model_params", 0),
        "model_grads": on.get("model_grads", 0), "other": on.get("other", 0), "zero_buffers": zero,
        "zero_allocated": {k.removeprefix("zero."): v.get("cuda" if on_gpu else "cpu", 0)
                           for k, v in by_owner.items() if k.startswith("zero.")},
        "largest_zero_buffers": sorted(((k, v) for k, v in zero.items() if v >= MiB), key=lambda kv: -kv[1])[:3],
        "total": sum(on.values()),
    }  # fmt: skip


def _rank_memory(r: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    before, setup, peak = r["before"], r["setup"], r["peak"]
    out: dict[str, Any] = {"rank": r["rank"], "parameters": r["parameters"], "torch_threads": r["torch_threads"],
                           "timeline": r["timeline"], "tensor_bytes": r["tensor_bytes"]}  # fmt: skip
    rss0 = before["status_kib"]["VmRSS"]
    out["rss_before_kib"] = rss0
    out["maxrss_before_kib"] = before["maxrss_kib"]  # the imports' own peak, if it was above the RSS then
    # setup: model build + deepspeed.initialize; the steps' peak was reset before the first step (when allowed).
    out["setup_peak_rss_kib"] = setup["maxrss_kib"]
    out["steps_peak_rss_kib"] = peak["maxrss_kib"]
    out["peak_rss_kib"] = max(setup["maxrss_kib"], peak["maxrss_kib"])
    out["peak_reset"] = setup["peak_reset"]
    out["rss_after_steps_kib"] = peak["status_kib"]["VmRSS"]
    # Where the RSS grew, after the steps: anonymous (tensors, allocator), file-backed (library pages touched,
    # the model's safetensors file), shared memory (DeepSpeed's CPU all-reduce buffer, if it were touched).
    for key, name in (("RssAnon", "anon"), ("RssFile", "file"), ("RssShmem", "shmem")):
        out[f"{name}_delta_kib"] = peak["status_kib"].get(key, 0) - before["status_kib"].get(key, 0)
    trimmed = peak.get("status_kib_after_malloc_trim", {})
    out["rss_after_trim_kib"] = trimmed.get("VmRSS", out["rss_after_steps_kib"])
    if on_gpu:
        base = before["cuda_allocated_bytes"] or 0
        out["measured_bytes"] = max(setup["cuda_max_allocated_bytes"], peak["cuda_max_allocated_bytes"]) - base
        out["setup_peak_bytes"] = setup["cuda_max_allocated_bytes"] - base
        out["train_peak_bytes"] = peak["cuda_max_allocated_bytes"] - base
        out["steady_bytes"] = peak["cuda_allocated_bytes"] - base
    else:
        out["measured_bytes"] = (out["peak_rss_kib"] - rss0) * 1024
        out["setup_peak_bytes"] = (setup["maxrss_kib"] - rss0) * 1024
        out["train_peak_bytes"] = (peak["maxrss_kib"] - rss0) * 1024 if setup["peak_reset"] else out["measured_bytes"]
        out["steady_bytes"] = (out["rss_after_steps_kib"] - rss0) * 1024
    return out


def _same_as_stage2(rows: list[dict[str, Any]]) -> str:
    """DeepSpeed's ZeRO 1 partitions the reduced gradients too (`averaged_gradients`): say so when it shows."""
    by = {r["config"]: r for r in rows if "tensors" in r}
    if (
        "1" in by
        and "2" in by
        and abs(by["1"]["tensors"]["total"] - by["2"]["tensors"]["total"]) < 0.02 * by["2"]["tensors"]["total"]
    ):
        return (
            "; ZeRO 1 holds what ZeRO 2 holds before the step: DeepSpeed keeps only the rank's partition of the "
            "reduced gradients there too (`averaged_gradients`)"
        )
    return ""


def _rss_note(rows: list[dict[str, Any]], on_gpu: bool) -> str:
    if on_gpu:
        return "GPU: allocator peaks only; host memory (offloaded state) is not in the measured columns."
    ranks = [r for row in rows for r in row.get("ranks", [])]
    if not ranks:
        return ""
    shm = max(r["shmem_delta_kib"] for r in ranks) / 1024
    file = max(r["file_delta_kib"] for r in ranks) / 1024
    trim = [(r["rss_after_steps_kib"] - r["rss_after_trim_kib"]) / 1024 for r in ranks]
    return (
        f"RSS above the live tensors: the steps' transient buffers (activations, gradient flattening and "
        f"communication copies), freed but kept by glibc (malloc_trim after the steps returns "
        f"{min(trim):.0f}–{max(trim):.0f} MiB), and {file:.0f} MiB of file pages (libraries, the mapped "
        f"safetensors file); DeepSpeed's 66 MiB CPU all-reduce buffer in /dev/shm adds {shm:.1f} MiB "
        "(training all-reduces go through gloo; the buffer serves only inference_all_reduce)."
    )


if __name__ == "__main__":
    sys.exit(main())
