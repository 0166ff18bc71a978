"""Model FLOPs utilisation (MFU): counted FLOPs per sample over the hardware's peak.

- FLOPs per sample are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` around
  one real training micro-batch (forward, loss and backward, whatever the model is: frozen parts,
  LoRA and prompt-tuning included), divided by its batch size. With gradient checkpointing the
  recomputed forward is counted too (strictly that is hardware FLOPs utilisation).
- The peak per device is, in this order: `logging.peak_tflops`; the GPU's dense datasheet value
  for the training precision (table below); else (CPU, or a GPU not in the table) a matmul rate
  measured on this device, at start-up, on every rank at once (so ranks sharing a CPU's cores
  share its rate).

mfu = FLOPs per sample x samples per second (all ranks) / (peak per device x world size).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: (bf16/fp16 tensor core, tf32, fp32).
# The SXM parts; the first name that occurs in torch.cuda.get_device_name() wins.
GPU_PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.0, 91.6),
    "A10G": (70.0, 35.0, 31.2),
    "RTX 4090": (165.2, 82.6, 82.6),
    "RTX 3090": (71.0, 35.6, 35.6),
    "V100": (125.0, 15.7, 15.7),
}


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak for this GPU and training dtype, or None when the GPU is not in the table."""
    for name, (half, tf32, fp32) in GPU_PEAK_TFLOPS.items():
        if name.lower() in device_name.lower():
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            return (tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32) * 1e12
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of square n x n matmuls in `dtype` on `device`: the best of a few timed rounds."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (allocations, kernel choice)
    sync()
    best, deadline, reps = 0.0, time.perf_counter() + seconds, 1
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            best = max(best, 2 * n**3 * reps / elapsed)
        if time.perf_counter() >= deadline:
            return best
        if elapsed < 0.02:
            reps *= 2


@dataclass(frozen=True)
class PeakFlops:
    per_device: float  # FLOP/s
    source: str  # "configured", "datasheet <GPU>", "measured <n>x<n> <dtype> matmul"


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float | None) -> PeakFlops:
    if configured_tflops is not None:
        return PeakFlops(configured_tflops * 1e12, "configured (logging.peak_tflops)")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is not None:
            return PeakFlops(peak, f"datasheet {name} {str(dtype).removeprefix('torch.')}")
    # bf16 on a CPU without AMX/AVX-512 runs far below fp32; measure what training will use.
    rate = measure_matmul_flops(device, dtype)
    return PeakFlops(rate, f"measured 1024x1024 {str(dtype).removeprefix('torch.')} matmul on {device.type}")


@dataclass
class MfuMeter:
    """Turns samples/s into MFU once the FLOPs per sample are known."""

    peak: PeakFlops
    world_size: int
    flops_per_sample: float | None = None

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype, configured_tflops: float | None,
                   world_size: int) -> MfuMeter:  # fmt: skip
        peak = peak_flops(device, dtype, configured_tflops)
        # 3 significant digits: a CPU's peak is below 0.1 TFLOP/s.
        log.info("mfu: peak %.3g TFLOP/s per device (%s)", peak.per_device / 1e12, peak.source)
        return cls(peak, world_size)

    def mfu(self, samples: float, seconds: float) -> float | None:
        """`samples` over all ranks in `seconds` of wall time; None before the FLOPs are counted."""
        if not self.flops_per_sample or seconds <= 0 or self.peak.per_device <= 0:
            return None
        return self.flops_per_sample * samples / seconds / (self.peak.per_device * self.world_size)

    def achieved_tflops(self, samples: float, seconds: float) -> float | None:
        if not self.flops_per_sample or seconds <= 0:
            return None
        return self.flops_per_sample * samples / seconds / 1e12


class FlopTally:
    """FLOPs summed over several `with tally.count():` blocks (forward here, backward there)."""

    def __init__(self) -> None:
        self.total = 0

    @contextlib.contextmanager
    def count(self) -> Iterator[None]:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.total += int(counter.get_total_flops())
