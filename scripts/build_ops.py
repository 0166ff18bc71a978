"""Compile DeepSpeed's CPU C++ ops once, before anything with a timeout runs them.

DeepSpeed JIT-compiles its ops on first use (shared-memory comm, fused Adam, CPU Adam: 1-2 min
each on 2 cores). Done inside a test or a launch, that time counts against a timeout and looks
like a hang. `make` runs this script after installing the packages; it builds exactly as a
launch would (ds_trainer/ops.py: this environment's own directory and ninja, whatever PATH
says, the build lock, a lock left by a killed build removed), so a launch finds the ops built.
When they are, it takes a few seconds. On a GPU machine it does nothing: DeepSpeed builds its
CUDA ops when they are first used.
"""

from __future__ import annotations

import logging
import os
import sys
import time

OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")


def main() -> int:
    import torch

    import ds_trainer  # noqa: F401 - pins this environment's op directory and ninja (ds_trainer/ops.py)
    from ds_trainer.ops import install_build_guard

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if torch.cuda.is_available():
        print("CUDA present: DeepSpeed builds its ops on first use")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    install_build_guard()
    # ninja's default runs cores + 2 compilers at once; each cc1plus on torch's headers takes
    # ~1 GiB. One per core is as fast on this machine and leaves memory for everything else.
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    print(f"DeepSpeed's ops: {os.environ['TORCH_EXTENSIONS_DIR']}")
    for name in OPS:
        start = time.perf_counter()
        get_accelerator().create_op_builder(name).load(verbose=False)
        print(f"{name}: ready ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
