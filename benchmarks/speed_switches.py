"""Which speed switches pay off? Each one's effect on the training step, against the default, in one process.

  attention       model.attn_implementation: eager vs sdpa (the default)
  checkpointing   model.gradient_checkpointing: on vs off; step time, and the memory it saves
  compile         torch.compile(model) vs not; the compilation (first step) apart from the steady-state step
  optimizer       torch.optim.AdamW (torch's default implementation: a for-loop on CPU, foreach on CUDA) vs
                  torch's fused AdamW vs DeepSpeed's FusedAdam (what the engine builds for the Trainer's "AdamW")
                  vs DeepSpeedCPUAdam (what it builds with deepspeed.offload_optimizer: cpu; CPU only here)

Every contender is the same random-init CLIP vision tower + head (`CLIPModel` from a local directory,
see step_overhead.small_clip_dir; same seed, same weights), with the Trainer's four parameter groups,
in a plain loop over the same pre-loaded batches: forward, cross-entropy, backward, optimizer step.
The default contender (sdpa, no checkpointing, not compiled, torch AdamW) differs from each other one
in one switch. Each repeat runs every contender's steps in turn (the order rotates); ratios are taken
per repeat (round) against that round's default and reported as median and range; the same for the
process's CPU time. The machine is shared and noisy: only the ratios mean anything.

CPU threads: one by default (--threads). On this shared 2-core machine, with other processes
running, two OpenMP threads per process spin-wait for each other: a forward + backward measured
0.9-3.6 s with two threads against 0.4 s with one, so two-thread step times measure the neighbours.
On a quiet machine, `--threads 0` runs with the Trainer's thread count (cores per local rank).

Memory: one more step per contender. On a GPU, torch.cuda's allocator statistics; on the CPU, the
torch profiler's memory events (every allocation and free of torch's CPU allocator, in time order).
Both give "after forward" (what the forward leaves allocated: the activations kept for backward, the
output) and "step peak" (the most allocated during forward + backward + optimizer step), each
relative to the start of the step, where the gradients were freed (zero_grad(set_to_none=True)).

It also starts a DeepSpeed engine (world of one, tiny model) from the JSON the Trainer derives,
with and without offload_optimizer: cpu, and records which optimizer class DeepSpeed really built.

On a GPU the weights and inputs are bf16 (as under DeepSpeed's bf16) unless --fp32, and the defaults
are 224 px (197 tokens), batch 64, 10 steps per round, 8 rounds (on the CPU: 112 px, 50 tokens,
batch 8, 1 step, 16 rounds); --cpu forces the CPU.

    python benchmarks/speed_switches.py                    # about 3 minutes on 2 busy cores
    python benchmarks/speed_switches.py --cpu --image-size 224 --repeats 8     # 197 tokens: ~4x the compute
    python benchmarks/speed_switches.py --switches attention,checkpointing --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never waits for a download

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import fmt_spread, md_table, spread, write_result
from benchmarks.step_overhead import make_batches, small_clip_dir

SWITCHES = ("attention", "checkpointing", "compile", "optimizer")
# (CPU, GPU) defaults: a GPU step of this small tower takes milliseconds, so more work per step and more steps.
GPU_DEFAULTS = {"steps": (1, 10), "repeats": (16, 8), "batch_size": (8, 64), "image_size": (112, 224)}
MIB = 2**20


@dataclass
class Contender:
    name: str  # "default", "attention=eager", ...
    switch: str  # "default" or one of SWITCHES
    setting: str  # what it runs, in words
    model: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    step_s: list[float] = field(default_factory=list)  # per round: mean seconds per step
    opt_s: list[float] = field(default_factory=list)  # per round: mean seconds in optimizer.step()
    cpu_s: list[float] = field(default_factory=list)  # per round: mean CPU seconds (this process) per step
    first_step_s: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)


def build_model(model_dir: Path, device: torch.device, dtype: torch.dtype, **switches: Any) -> nn.Module:
    from ds_trainer.models import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(str(model_dir), **switches).to(device, dtype).train()


def build_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    """The Trainer's parameter groups under one of four AdamW implementations."""
    from ds_trainer.config import TrainingSection
    from ds_trainer.optim import param_groups

    groups = param_groups(model, TrainingSection(learning_rate=1e-4, weight_decay=0.01))
    if kind == "torch":
        return torch.optim.AdamW(groups)
    if kind == "torch-fused":
        return torch.optim.AdamW(groups, fused=True)
    if kind == "ds-fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True)
    if kind == "ds-cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True)
    raise ValueError(kind)


def torch_adamw_default(device: torch.device) -> str:
    # torch picks foreach when every parameter is on a device with foreach kernels (CUDA), else a for-loop.
    return "foreach" if device.type == "cuda" else "for-loop"


def build_contenders(model_dir: Path, switches: list[str], device: torch.device, dtype: torch.dtype,
                     skipped: dict[str, str]) -> list[Contender]:  # fmt: skip
    """The default and one contender per switch setting; a DeepSpeed optimizer whose op fails to build: `skipped`."""
    from ds_trainer.errors import first_line

    def contender(name: str, switch: str, setting: str, optimizer: str = "torch", compile_: bool = False,
                  **model_switches: Any) -> Contender:  # fmt: skip
        model = build_model(model_dir, device, dtype, **model_switches)
        opt = build_optimizer(optimizer, model)
        return Contender(name, switch, setting, torch.compile(model) if compile_ else model, opt)

    default = f"sdpa, no checkpointing, not compiled, torch AdamW ({torch_adamw_default(device)})"
    out = [contender("default", "default", default)]
    if "attention" in switches:
        out.append(contender("attention=eager", "attention", "attn_implementation: eager", attn_implementation="eager"))
    if "checkpointing" in switches:
        out.append(contender("checkpointing=on", "checkpointing", "gradient_checkpointing: true",
                             gradient_checkpointing=True))  # fmt: skip
    if "compile" in switches:
        out.append(contender("compile=on", "compile", "torch.compile(model)", compile_=True))
    if "optimizer" in switches:
        out.append(contender("optimizer=torch-fused", "optimizer", "torch.optim.AdamW(fused=True)", "torch-fused"))
        kinds = [("ds-fused", "FusedAdam")] + ([("ds-cpu", "DeepSpeedCPUAdam")] if device.type == "cpu" else [])
        for kind, cls in kinds:
            try:  # DeepSpeed builds its ops on first use; a machine without a compiler cannot
                out.append(contender(f"optimizer={kind}", "optimizer", f"deepspeed.ops.adam.{cls}", kind))
            except Exception as exc:  # noqa: BLE001 - recorded in the result, the other switches still run
                skipped[f"optimizer={kind}"] = f"{type(exc).__name__}: {first_line(exc)}"
    return out


def free_grads(optimizer: torch.optim.Optimizer) -> None:
    """zero_grad(set_to_none=True); DeepSpeed's FusedAdam.zero_grad has no such argument."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


def run_steps(c: Contender, batches: list, sync: Callable[[], None]) -> tuple[float, float, float]:
    """Means over the batches: (seconds per step, seconds in optimizer.step(), CPU seconds per step)."""
    in_opt = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    for x, y in batches:
        F.cross_entropy(c.model(x).float(), y).backward()
        sync()
        t0 = time.perf_counter()
        c.optimizer.step()
        sync()
        in_opt += time.perf_counter() - t0
        free_grads(c.optimizer)
    sync()
    n = len(batches)
    return (time.perf_counter() - start) / n, in_opt / n, (time.process_time() - cpu_start) / n


FORWARD_MARK = "speed_switches.forward"


def step_memory(c: Contender, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, float]:
    """MiB allocated after forward and at the step's peak, relative to the step's start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = F.cross_entropy(c.model(x).float(), y)
        torch.cuda.synchronize()
        after_forward = torch.cuda.memory_allocated() - base
        loss.backward()
        c.optimizer.step()
        free_grads(c.optimizer)
        torch.cuda.synchronize()
        return {"after_forward_mib": after_forward / MIB, "peak_mib": (torch.cuda.max_memory_allocated() - base) / MIB}
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function(FORWARD_MARK):
            loss = F.cross_entropy(c.model(x).float(), y)
        loss.backward()
        c.optimizer.step()
        free_grads(c.optimizer)
    events = prof.profiler.kineto_results.events()
    (forward_end,) = [e.end_ns() for e in events if e.name() == FORWARD_MARK]
    allocated = peak = after_forward = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        allocated += e.nbytes()  # negative for a free
        peak = max(peak, allocated)
        if e.start_ns() <= forward_end:
            after_forward = allocated
    return {"after_forward_mib": after_forward / MIB, "peak_mib": peak / MIB}


def engine_optimizers(batch_size: int) -> dict[str, str]:
    """The optimizer class DeepSpeed builds from the Trainer's JSON, per offload_optimizer setting."""
    import deepspeed

    from ds_trainer.config import build_config
    from ds_trainer.distributed import detect_device
    from ds_trainer.ds_config import build_ds_config
    from ds_trainer.errors import first_line

    out = {}
    for offload in ("none", "cpu"):
        cfg = build_config({"deepspeed": {"zero_stage": 1, "offload_optimizer": offload},
                            "training": {"batch_size": batch_size}}, source="speed_switches")  # fmt: skip
        ds = build_ds_config(cfg, world_size=1, steps_per_epoch=10, device=detect_device())
        model = nn.Linear(8, 2)
        try:
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        except Exception as exc:  # noqa: BLE001 - e.g. an op DeepSpeed cannot build here; recorded, not fatal
            out[f"offload_optimizer={offload}"] = f"{ds['optimizer']['type']} -> failed: {first_line(exc)}"
            continue
        opt = engine.basic_optimizer
        built = f"{type(opt).__module__}.{type(opt).__name__}"
        out[f"offload_optimizer={offload}"] = f"{ds['optimizer']['type']} -> {built}"
        engine.destroy()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--switches", default=",".join(SWITCHES), help=f"comma-separated subset of {','.join(SWITCHES)}")
    p.add_argument("--steps", type=int, help="timed steps per contender per round (CPU 1, GPU 10)")
    p.add_argument("--repeats", type=int, help="rounds, each runs every contender's steps in turn (CPU 16, GPU 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender (the first compiles)")
    p.add_argument("--batch-size", type=int, help="CPU 8, GPU 64")
    p.add_argument("--image-size", type=int, help="patch 16: (size/16)^2 + 1 tokens (CPU 112, GPU 224)")
    p.add_argument("--hidden", type=int, default=384, help="width of the random-init CLIP vision tower")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU: torch threads (0: the Trainer's choice, cores per local rank); see the docstring",
    )
    p.add_argument("--fp32", action="store_true", help="on a GPU: fp32 instead of bf16")
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="compile with inductor's usual cache (a hit after the first run); default: a fresh one",
    )
    p.add_argument("--no-engine-check", action="store_true", help="skip starting DeepSpeed engines")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/speed_switches.json)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    for name, (on_cpu, on_gpu) in GPU_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    args.switches = [s for s in args.switches.split(",") if s]
    if unknown := set(args.switches) - set(SWITCHES):
        p.error(f"unknown switches {sorted(unknown)}; choose from {','.join(SWITCHES)}")
    if min(args.steps, args.repeats, args.warmup) < 1:
        p.error("--steps, --repeats and --warmup must be at least 1")
    return args


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            skipped: dict[str, str]) -> list[Contender]:  # fmt: skip
    """Build the contenders, warm each up (timing its first step), measure its memory, then time the rounds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="ds_trainer_speed_") as tmp:
        if not args.warm_cache:  # the compile time of a first run, not of a cache hit
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        model_dir = small_clip_dir(Path(tmp), args.image_size, args.hidden, args.layers)
        contenders = build_contenders(model_dir, args.switches, device, dtype, skipped)
        n = args.warmup + args.steps + 1  # warm-up, timed, memory probe
        batches = [(x.to(device, dtype), y.to(device)) for x, y in make_batches(n, args.batch_size, args.image_size)]
        warm, timed, probe = batches[: args.warmup], batches[args.warmup : -1], batches[-1]
        for c in contenders:
            start = time.perf_counter()
            run_steps(c, warm[:1], sync)
            c.first_step_s = time.perf_counter() - start
            if len(warm) > 1:
                run_steps(c, warm[1:], sync)
            c.memory = step_memory(c, *probe, device)
        for r in range(args.repeats):
            k = r % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                step_s, opt_s, cpu_s = run_steps(c, timed, sync)
                c.step_s.append(step_s)
                c.opt_s.append(opt_s)
                c.cpu_s.append(cpu_s)
    return contenders


def summarise(contenders: list[Contender]) -> tuple[dict[str, Any], list[list[str]]]:
    """Per contender: times, ratios to the default, memory (JSON), and its row of the Markdown table."""
    default = contenders[0]
    results, rows = {}, []
    for c in contenders:
        ratio = [s / d for s, d in zip(c.step_s, default.step_s)]
        opt_ratio = [s / d for s, d in zip(c.opt_s, default.opt_s)]
        cpu_ratio = [s / d for s, d in zip(c.cpu_s, default.cpu_s)]
        results[c.name] = {
            "switch": c.switch, "setting": c.setting, "step_time_s": spread(c.step_s),
            "optimizer_step_s": spread(c.opt_s), "step_time_ratio": spread(ratio), "cpu_time_ratio": spread(cpu_ratio),
            "optimizer_step_ratio": spread(opt_ratio), "first_step_s": c.first_step_s, "memory": c.memory,
            "peak_memory_ratio": c.memory["peak_mib"] / default.memory["peak_mib"],
            "after_forward_ratio": c.memory["after_forward_mib"] / default.memory["after_forward_mib"],
        }  # fmt: skip
        if c.switch == "compile":
            results[c.name]["compile_s"] = c.first_step_s - statistics.median(c.step_s)
        if c is default:
            continue
        note = ""
        if c.switch == "compile":
            note = f"compilation {results[c.name]['compile_s']:.0f} s (first step {c.first_step_s:.0f} s)"
        elif c.switch == "optimizer":
            note = f"optimizer.step(): {fmt_spread(spread(opt_ratio), 2)} of torch AdamW's"
        rows.append([c.switch, c.setting, fmt_spread(spread(ratio), 2), fmt_spread(spread(cpu_ratio), 2),
                     f"{c.memory['after_forward_mib']:.0f} / {default.memory['after_forward_mib']:.0f}",
                     f"{c.memory['peak_mib']:.0f} / {default.memory['peak_mib']:.0f}", note])  # fmt: skip
    return results, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ds_trainer.distributed import init_distributed

    init_distributed()  # a world of one, as under the launcher (and its CPU thread count)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else torch.float32
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    engines = {} if args.no_engine_check else engine_optimizers(args.batch_size)
    skipped: dict[str, str] = {}
    contenders = measure(args, device, dtype, skipped)
    elapsed = time.perf_counter() - started
    results, rows = summarise(contenders)

    default = contenders[0]
    n_params = sum(p.numel() for g in default.optimizer.param_groups for p in g["params"])
    tokens = (args.image_size // 16) ** 2 + 1
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    threads_text = (
        "'CPU time ratio' is the same for this process's CPU time, which time-sharing with other processes does "
        "not stretch (with more than one thread it counts OpenMP spin-waits too)." if device.type == "cpu" else
        "'CPU time ratio' is host CPU time, not meaningful on a GPU."
    )  # fmt: skip
    mem_how = "torch.cuda's allocator statistics" if device.type == "cuda" else "the torch profiler's memory events"
    table = md_table(["switch", "setting (vs default)", "step time ratio", "CPU time ratio",
                      "after forward MiB (vs default)", "step peak MiB (vs default)", "notes"], rows)  # fmt: skip
    engine_text = "; ".join(f"{k}: `{v}`" for k, v in engines.items()) or "not checked (--no-engine-check)"
    skipped_text = "".join(f" Not measured: {k} ({v})." for k, v in skipped.items())
    markdown = (
        f"{table}\n\n"
        f"A plain training loop (forward, cross-entropy, backward, optimizer step) of a random-init CLIP vision "
        f"tower ({args.hidden} wide, {args.layers} layers, {args.image_size} px, patch 16: {tokens} tokens; "
        f"{n_params / 1e6:.1f} M parameters) + head, batch {args.batch_size}, {precision}, {where}. Each contender "
        f"differs from the default ({default.setting}) in one switch; step time ratio: contender/default per round, "
        f"median (range) over {args.repeats} rounds of {args.steps} step(s), contenders alternated in one process; "
        f"{threads_text} Memory ({mem_how}) is relative to the start "
        f"of a step (gradients freed): 'after forward' is what the forward keeps for backward, 'step peak' adds the "
        f"gradients and optimizer temporaries. What DeepSpeed builds from the Trainer's JSON: {engine_text}; in the "
        f"engine the ZeRO optimizer steps one flat fp32 partition, here each optimizer steps the parameters."
        + skipped_text
    )
    parts = []
    for c in contenders[1:]:
        r = results[c.name]
        part = f"{c.name} {r['step_time_ratio']['median']:.2f}x"
        if c.switch == "checkpointing":
            part += f" (after-forward memory {r['after_forward_ratio']:.2f}x, peak {r['peak_memory_ratio']:.2f}x)"
        if c.switch == "compile":
            part += f" (+{r['compile_s']:.0f} s compile)"
        parts.append(part)
    summary = (f"step time vs default ({precision}, {where}): " + ", ".join(parts)
               + f"; median of {args.repeats} rounds, {elapsed:.0f} s")  # fmt: skip
    write_result(
        "speed_switches", args.out, argv, summary, markdown,
        settings={**vars(args), "device": str(device), "precision": precision, "parameters": n_params,
                  "tokens": tokens, "torch_adamw_default": torch_adamw_default(device)},
        contenders=results, skipped=skipped, engine_optimizers=engines, default=default.setting, elapsed_s=elapsed,
        raw={c.name: {"step_s": c.step_s, "optimizer_step_s": c.opt_s, "cpu_s": c.cpu_s} for c in contenders},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
