"""One rank of a benchmark job: ds_trainer.Trainer on in-memory batches, its numbers in <out-dir>/rank<R>.json.

benchmarks/zero_memory.py and benchmarks/scaling.py start it through the real launcher:

    deepspeed --num_gpus 2 --master_port P benchmarks/workers/rank_worker.py --model-dir D --out-dir O ...

Every rank trains the same pre-loaded batches (a list of (images, labels) tensors: the data loader
is not measured) for `--epochs` epochs of `--steps` optimizer steps. The first epoch is the warm-up
(optimizer state is allocated at its first step); with `--comms` one more epoch runs with DeepSpeed's
comms logger on (enabled through `deepspeed.config_file`, the Trainer's raw-JSON merge) and the
logged collectives are written; the epochs before it run with the logger off, so that its
per-op synchronisation does not enter their times. A benchmark keeps no checkpoints:
`save_checkpoint` is a no-op here, so the end of training does not add a checkpoint's memory or time.

Per rank: the epoch times (`epoch_time_s` of the Trainer's metric rows); the RSS right before the model
is built; the peak RSS of the set-up (model build, deepspeed.initialize) and, reset before the first step
(/proc/self/clear_refs), of the training epochs; the /proc/self/status breakdown (anonymous,
file-backed, shared memory) after them, before and after glibc's malloc_trim; on a GPU
`torch.cuda.max_memory_allocated` for the same two phases; with `--tensors` the live tensors' bytes by
owner right before the last optimizer step (gradients and Adam state both live then).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH.parent))  # ds_trainer
sys.path.insert(0, str(BENCH))  # step_overhead's model and batches


def launch(world_size: int, worker_args: list[str], out_dir: Path, timeout_s: float = 600,
           threads_per_rank: int | None = 1) -> tuple[list[dict[str, Any]] | None, str]:  # fmt: skip
    """Run this worker on `world_size` local ranks through the deepspeed launcher; (per-rank results, log tail).

    The results are None when the job failed or timed out (the log tail says why). Each launch gets its
    own free port; the launcher's process group is killed on a timeout, and any shared-memory all-reduce
    buffer named after the port is removed afterwards (ds_trainer unlinks its own; this covers a crash).
    """
    import glob
    import signal
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env["PYTHONPATH"] = str(BENCH.parent)
    env["HF_HUB_OFFLINE"] = "1"
    if threads_per_rank is not None:
        env["OMP_NUM_THREADS"] = str(threads_per_rank)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world_size), "--master_port", str(port),
           str(Path(__file__).resolve()), "--out-dir", str(out_dir), *worker_args]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=BENCH.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started (their own session)
        log, _ = proc.communicate()
        log += f"\n(killed after {timeout_s:.0f} s)"
    finally:
        for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            Path(leftover).unlink(missing_ok=True)
    files = [out_dir / f"rank{r}.json" for r in range(world_size)]
    if proc.returncode != 0 or not all(f.is_file() for f in files):
        return None, log[-3000:]
    return [json.loads(f.read_text()) for f in files], log[-3000:]


# Set by an in-process world of one; a launched job must not inherit them (as tests/conftest.py's launch_env).
_RANK_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
)


def proc_status_kib() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in KiB (Linux)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM and ru_maxrss; Linux >= 4.0); False where it is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def malloc_trim() -> bool:
    """Return glibc's free heap memory to the system (False where there is no glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def resident_bytes(address: int, nbytes: int) -> int:
    """How much of [address, address + nbytes) is in RAM (mincore): torch.empty's pages count once written.

    Falls back to nbytes where mincore is not available. A page shared with a neighbouring small
    allocation counts for both, so small tensors may be slightly over-counted (never beyond nbytes).
    """
    import ctypes

    import numpy as np

    if nbytes == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    length = address + nbytes - start
    vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
    try:
        if ctypes.CDLL(None).mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
            return nbytes
    except (OSError, AttributeError):
        return nbytes
    return min(nbytes, int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page)


def live_tensor_bytes(engine: Any) -> dict[str, dict[str, int]]:
    """Bytes of the live tensors by owner and device (and "cpu_resident": the part in RAM), each storage once.

    Owners in order of claim: Adam's moments (the inner optimizer's state), the model's parameters (and
    ZeRO 3's `ds_tensor` partitions), their `.grad`, then each attribute of DeepSpeed's optimizer wrapper
    by name (its flat buffers, fp32 partitions, gradient buckets), and last "other": every remaining
    tensor the garbage collector knows (batches, activations kept by the Trainer, small state).
    """
    import gc

    import torch

    seen_storages: set[int] = set()
    seen_objects: set[int] = set()

    def claim(obj: Any, into: dict[str, int], depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                return
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key and key not in seen_storages:
                seen_storages.add(key)
                into[obj.device.type] = into.get(obj.device.type, 0) + storage.nbytes()
                if obj.device.type == "cpu":
                    into["cpu_resident"] = into.get("cpu_resident", 0) + resident_bytes(key, storage.nbytes())
            return
        if depth >= 4 or id(obj) in seen_objects or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return
        seen_objects.add(id(obj))
        if isinstance(obj, dict):
            for value in obj.values():
                claim(value, into, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                claim(value, into, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            for value in vars(obj).values():
                claim(value, into, depth + 1)

    out: dict[str, dict[str, int]] = {}
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    params = list(engine.module.parameters())
    for name, objs in (("adam_moments", [getattr(inner, "state", {})]),
                       ("model_params", [x for q in params for x in (q, getattr(q, "ds_tensor", None))]),
                       ("model_grads", [q.grad for q in params])):  # fmt: skip
        into: dict[str, int] = {}
        for obj in objs:
            claim(obj, into)
        out[name] = into
    if wrapper is not inner:
        seen_objects.update((id(inner), id(engine)))
        for name, value in vars(wrapper).items():
            into = {}
            claim(value, into, 1)
            if into:
                out[f"zero.{name.replace('_DeepSpeedZeroOptimizer_Stage3__', '__')}"] = into
    other: dict[str, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            claim(obj, other)
    out["other"] = other
    return {k: v for k, v in out.items() if v}


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="a local CLIP vision directory (step_overhead.small_clip_dir)")
    p.add_argument("--out-dir", required=True, help="rank<R>.json goes here")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per epoch")
    p.add_argument("--epochs", type=int, default=1, help="epochs without the comms logger (the first is warm-up)")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--offload-optimizer", choices=["none", "cpu"], default="none")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--comms", action="store_true", help="one more epoch with DeepSpeed's comms logger on")
    p.add_argument(
        "--tensors", action="store_true", help="after the training epochs, attribute the live tensors' bytes"
    )
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the launcher appends it; RANK is read instead
    args = p.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator

    import deepspeed.comm as ds_comm
    import torch
    from step_overhead import build_model, make_batches

    from ds_trainer import Trainer
    from ds_trainer.config import build_config
    from ds_trainer.distributed import init_distributed
    from ds_trainer.hooks import Hook

    env = init_distributed()  # the process group first, so that the baseline below includes it
    # Modules the model and the engine load on first use: imported before the baseline, so that
    # the peak minus the baseline is (mostly) tensors, not code.
    import deepspeed.ops.adam
    import deepspeed.runtime.zero.stage3
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import transformers.models.clip.modeling_clip  # noqa: F401

    out_dir = Path(args.out_dir)
    work = out_dir / f"rank{env.rank}-work"
    work.mkdir(parents=True, exist_ok=True)
    batches = make_batches(args.steps, args.batch_size, args.image_size)
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = {"status_kib": proc_status_kib(), "maxrss_kib": maxrss_kib(),
              "cuda_allocated_bytes": torch.cuda.memory_allocated() if cuda else None}  # fmt: skip
    timeline = {"imports_and_init_s": time.perf_counter() - t_start}

    model = build_model(Path(args.model_dir))
    n_params = sum(q.numel() for q in model.parameters())
    comm_epoch = args.epochs + 1 if args.comms else None
    num_epochs = args.epochs + (1 if args.comms else 0)
    ds_json = work / "ds_extra.json"
    ds_json.write_text(json.dumps({"comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}))
    cfg = build_config({
        "name": "bench",
        "training": {"batch_size": args.batch_size, "learning_rate": 1e-4, "num_epochs": num_epochs,
                     "warmup_epochs": 0, "save_frequency": 0, "monitor": "train_loss", "mixed_precision": args.precision != "fp32",
                     "checkpoint_dir": str(work / "ckpt")},
        "deepspeed": {"zero_stage": args.zero_stage, "offload_optimizer": args.offload_optimizer,
                      "precision": args.precision, **({"config_file": str(ds_json)} if args.comms else {})},
        "logging": {"run_dir": str(work / "run"), "log_every_n_steps": 1_000_000, "tensorboard": False, "mfu": False,
                    "progress_bar": "off"},
    }, source="rank_worker")  # fmt: skip
    setup: dict[str, Any] = {}  # model build + Trainer setup (deepspeed.initialize), up to the first step
    peak: dict[str, Any] = {}  # the training epochs (without the comms epoch)
    tensors: dict[str, Any] = {}
    comms: dict[str, dict[str, int]] = {}  # op -> message bytes -> calls, in the comms epoch
    comm_ms: dict[str, float] = {}  # op -> total milliseconds in the comms epoch

    class EpochProbe(Hook):
        """Around each epoch: the comms logger, memory peaks, and the live tensors before its last step."""

        def on_epoch_start(self, epoch: int) -> None:
            self.counting, self.snapshot, self.calls = epoch == comm_epoch, args.tensors and epoch == args.epochs, 0
            if epoch == 1:
                # The peak so far is the set-up's (from_pretrained, DeepSpeed flattening and partitioning the
                # parameters); reset it, so that the peak read after the epochs is the training steps' own.
                timeline["setup_s"] = time.perf_counter() - t_start - timeline["imports_and_init_s"]
                setup.update(
                    status_kib=proc_status_kib(),
                    maxrss_kib=maxrss_kib(),
                    peak_reset=reset_peak_rss(),
                    cuda_max_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                )
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
            if args.comms:
                ds_comm.configure(enabled=self.counting, prof_all=self.counting)
                ds_comm.reset_log()

        def on_before_step(self, step: int) -> None:
            # The live tensors right before the epoch's last optimizer step: grads and Adam state both exist.
            self.calls += 1
            if self.snapshot and self.calls == args.steps:
                tensors.update(live_tensor_bytes(trainer.engine))

        def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
            if self.counting:
                for name, sizes in ds_comm.comms_logger.comms_dict.items():
                    comms[name] = {str(size): int(v[0]) for size, v in sizes.items()}
                    # DeepSpeed 0.19's timed_op reads its per-name timer with elapsed(reset=False), so each logged
                    # latency is the running total of that name's calls: the largest is the total (ms).
                    comm_ms[name] = max((max(v[1]) for v in sizes.values() if v[1]), default=0.0)
                ds_comm.configure(enabled=False)
            else:  # peaks only grow: after the last of these epochs they are the epochs' peak (comms epoch excluded)
                peak.update(
                    status_kib=proc_status_kib(),
                    maxrss_kib=maxrss_kib(),
                    cuda_max_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                    cuda_allocated_bytes=torch.cuda.memory_allocated() if cuda else None,
                )
                if epoch == args.epochs and malloc_trim():
                    # What the allocator held but no tensor used: freed memory glibc had not returned yet.
                    peak["status_kib_after_malloc_trim"] = proc_status_kib()

    class BenchTrainer(Trainer):
        """The Trainer without checkpoints: a benchmark keeps none."""

        def save_checkpoint(self, tag: str, update_latest: bool = True) -> Path:
            return Path(self.t.checkpoint_dir) / tag

    # No epoch tag is written, so there is none for `best` to link to or for pruning to drop.
    from ds_trainer import checkpoint

    checkpoint.after_epoch_save = lambda *args, **kwargs: None

    trainer = BenchTrainer(model, batches, None, config=cfg, device="cpu" if args.cpu else None, hooks=[EpochProbe()])
    rows = trainer.train()
    timeline["total_s"] = time.perf_counter() - t_start
    result = {
        "rank": env.rank, "world_size": env.world_size, "parameters": n_params,
        "device": str(trainer.device), "torch_threads": torch.get_num_threads(),
        "zero_stage": args.zero_stage, "offload_optimizer": args.offload_optimizer, "precision": args.precision,
        "batch_size": args.batch_size, "steps_per_epoch": args.steps,
        "epoch_time_s": [r["epoch_time_s"] for r in rows if r["epoch"] != comm_epoch],
        "comm_epoch_time_s": next((r["epoch_time_s"] for r in rows if r["epoch"] == comm_epoch), None),
        "before": before, "setup": setup, "peak": peak, "tensor_bytes": tensors, "timeline": timeline,
        "comms": comms, "comms_total_ms": comm_ms,
    }  # fmt: skip
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
