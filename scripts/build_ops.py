"""Compile DeepSpeed's CPU C++ ops once, before anything with a timeout runs them.

DeepSpeed JIT-compiles its ops on first use (shared-memory comm, fused Adam, CPU Adam: minutes
on 2 cores). Done inside a test, that time counts against the test's timeout, and a build killed
half way leaves torch's `lock` file behind, on which every later build waits forever. `make`
runs this script after installing the packages. On a GPU machine it does nothing: DeepSpeed
builds its CUDA ops when they are first used.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")
STALE_S = 15 * 60


def _clear_stale_locks() -> None:
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC2701 - torch's own cache root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(_get_build_directory("x", False)).parent)
    for lock in root.glob("*/lock"):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_S:
            print(f"removing a stale build lock ({age / 60:.0f} min old): {lock}", file=sys.stderr)
            lock.unlink(missing_ok=True)


def main() -> int:
    import torch

    if torch.cuda.is_available():
        print("CUDA present: DeepSpeed builds its ops on first use")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    _clear_stale_locks()
    # ninja's default runs cores + 2 compilers at once; each cc1plus on torch's headers takes
    # ~1 GiB. One per core is as fast on this machine and leaves memory for everything else.
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    for name in OPS:
        start = time.perf_counter()
        get_accelerator().create_op_builder(name).load(verbose=False)
        print(f"{name}: ready ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
