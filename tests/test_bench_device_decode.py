"""Smoke test of benchmarks/device_decode.py: the CPU fallback's row is written; without CUDA and --cpu, exit 2.

The GPU rate (nvJPEG) is only measured on a GPU machine; this checks that the script runs and says so.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO, run_cmd

pytestmark = pytest.mark.bench

SCRIPT = str(REPO / "benchmarks" / "device_decode.py")


def test_device_decode_writes_the_cpu_fallback_row(tmp_path):
    out = tmp_path / "device_decode.json"
    proc = run_cmd([sys.executable, SCRIPT, "--cpu", "--images", "8", "--batch", "4", "--repeats", "1",
                    "--out", str(out)], timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["images"] == 8 and row["cpu_worker_images_per_s"] > 0
    assert row[f"decode_batch_{'cuda' if torch.cuda.is_available() else 'cpu'}_images_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine measures the GPU rate instead")
def test_device_decode_without_cuda_exits_2_in_one_line():
    proc = run_cmd([sys.executable, SCRIPT, "--images", "8"], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "no CUDA torchvision here" in proc.stderr
