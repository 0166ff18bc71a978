"""Smoke tests of benchmarks/train_throughput.py and benchmarks/data_throughput.py on a tiny setting.

Single process (no launcher): the training run is a world of one, as `python train.py` is.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import REPO, run_cmd

# The benchmark scripts start and write their results (make test-bench; .ci/run runs it after make test).
pytestmark = pytest.mark.bench


def test_train_throughput_writes_its_rows(tmp_path):
    out = tmp_path / "train_throughput.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--sizes", "128", "--formats",
                    "jpeg", "--steps", "3", "--batch-size", "8", "--no-demo", "--out", str(out)],
                   timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "train_throughput" and result["settings"]["workers"] == 1
    (row,) = result["rows"]
    assert row["set"] == "jpeg128" and row["steps"] == 3 and row["workers"] == 1
    for key in ("samples_per_s", "epoch_time_s", "first_batch_s", "step_rate_no_wait", "loader_alone_img_s"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert 0 <= row["data_wait_fraction"] <= 1 and 0 <= row["steady_wait_fraction"] <= 1
    assert 0 < row["data_wait_s"] <= row["epoch_time_s"]  # at least the first batch is waited for
    assert row["workers_needed"] >= 1 and isinstance(row["keeps_up"], bool)
    assert "| jpeg128 |" in result["markdown"] and "train_throughput: at 1 worker(s)" in proc.stdout


def test_data_throughput_writes_its_rows(tmp_path):
    out = tmp_path / "data_throughput.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--sizes", "128", "--formats",
                    "jpeg,png", "--batches", "2", "--batch-size", "4", "--steps", "1", "--out", str(out)],
                   timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "data_throughput" and result["step_img_s"] > 0
    assert [(r["size"], r["format"]) for r in result["rows"]] == [(128, "jpeg"), (128, "png")]
    for r in result["rows"]:
        assert r["loader_img_s"] > 0 and r["workers"] == 1 and r["cores_per_step"] > 0
    assert "| 128² | png |" in result["markdown"] and "data_throughput: loader" in proc.stdout
    assert "loader img/s" in proc.stdout  # the printed table is still there
