"""Smoke tests of the benchmarks: each script starts and writes its result on a tiny setting.

The benchmarks themselves run with `make bench`, never in `make test`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cmd

# The benchmark scripts start and write their results (make test-bench; .ci/run runs it after make test).
pytestmark = pytest.mark.bench


def test_step_overhead_writes_its_ratios(tmp_path):
    out = tmp_path / "step_overhead.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "step_overhead.py"), "--steps", "2", "--repeats", "1",
                    "--hidden", "64", "--layers", "1", "--image-size", "32", "--batch-size", "4", "--out", str(out)],
                   timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["step_time_s"]) == {"trainer", "engine", "torch"}
    for name in ("trainer", "engine", "torch"):
        assert len(result["raw"][name]) == 1 and result["raw"][name][0] > 0
    assert result["trainer_over_engine"]["median"] > 0 and result["settings"]["zero_stage"] == 1
    assert "step_overhead: trainer/engine step time" in proc.stdout
    assert result["flops_per_sample"] > 0 and all(0 < result["mfu"][k]["median"] < 1 for k in result["raw"])
    assert "| Trainer / engine |" in result["markdown"] and result["machine"]["cpus"] >= 1


def test_prepared_shards_writes_its_ratios(tmp_path):
    out = tmp_path / "prepared_shards.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "prepared_shards.py"), "--images", "32", "--rounds", "1",
                    "--workers", "1", "--out", str(out)], timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["median"]) == 5 and all(v > 0 for v in result["median"].values())
    assert "vs load-time align" in result["markdown"] and "prepared_shards: prepared --align-jpeg 96" in proc.stdout


def test_decode_path_writes_its_ratios(tmp_path):
    found = [Path(pytest.importorskip(name).__file__).parents[1] for name in ("pyspng", "simplejpeg")]
    out = tmp_path / "decode_path.json"
    path = os.pathsep.join(dict.fromkeys([str(REPO), *map(str, found)]))  # where this process found them
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "decode_path.py"), "--images", "24", "--decode-images",
                    "2", "--rounds", "1", "--out", str(out)], timeout=300, PYTHONPATH=path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["loader_median"]) == 5 and all(v > 0 for v in result["loader_median"].values())
    assert len(result["decode_speedup"]) == 3 and all(v > 0 for v in result["decode_speedup"].values())
    assert "vs Pillow, float" in result["markdown"] and "decode_path: decode vs Pillow" in proc.stdout
