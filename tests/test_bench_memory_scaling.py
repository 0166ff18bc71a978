"""Smoke tests of benchmarks/zero_memory.py and benchmarks/scaling.py: 2 real ranks on a tiny model.

Each checks that the script starts its launcher jobs and writes its JSON with sane positive numbers;
the benchmarks themselves run with their defaults outside the test suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cmd

from ds_trainer.distributed import SHM_DIR, SHM_PREFIX

pytestmark = [pytest.mark.distributed, pytest.mark.bench]

TINY = ["--hidden", "64", "--layers", "1", "--image-size", "32", "--cpu"]


def shm_files() -> set[Path]:
    return set(SHM_DIR.glob(f"{SHM_PREFIX}_*"))


def test_zero_memory_measures_each_stage(tmp_path):
    out = tmp_path / "zero_memory.json"
    leaked_before = shm_files()
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "zero_memory.py"), "--configs", "0,2", "--steps", "2",
                    *TINY, "--out", str(out)], timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "zero_memory" and result["settings"]["world_size"] == 2
    assert [c["config"] for c in result["configs"]] == ["0", "2"]
    params = result["settings"]["parameters"]
    for c in result["configs"]:
        assert len(c["ranks"]) == 2 and all(r["parameters"] == params for r in c["ranks"])
        for r in c["ranks"]:
            assert r["peak_rss_kib"] >= r["rss_before_kib"] > 0
            assert r["measured_bytes"] > 0 and r["torch_threads"] == 1
        assert c["theory_measured_bytes"] > 0 and c["measured_over_theory"] > 0
        # Adam's moments are live and partitioned from ZeRO 1 on: 8P bytes at ZeRO 0, 8P/2 per rank at ZeRO 2.
        assert c["tensors"]["adam_moments"] == pytest.approx(8 * params / (1 if c["zero_stage"] == 0 else 2), rel=0.01)
    assert result["configs"][1]["theory_measured_bytes"] < result["configs"][0]["theory_measured_bytes"]
    assert "| ZeRO |" in result["markdown"] and "zero_memory: ZeRO 0" in proc.stdout
    assert shm_files() <= leaked_before  # no shared-memory all-reduce buffer left behind


def test_scaling_measures_rate_efficiency_and_volume(tmp_path):
    out = tmp_path / "scaling.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--world-sizes", "1,2", "--steps", "2",
                    "--epochs", "2", "--repeats", "1", "--batch-size", "4", *TINY, "--out", str(out)],
                   timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["world_sizes"] == [1, 2]
    one, two = result["results"]["1"], result["results"]["2"]
    for entry in (one, two):
        assert entry["samples_per_s"]["median"] > 0
    assert one["efficiency"]["median"] == pytest.approx(1.0)
    assert two["efficiency"]["median"] > 0
    # The gradient all-reduce of ZeRO 1 was logged at 2 ranks: about 2(N-1)/N x 4P bytes per step, plus
    # the all-gather of the updated parameter shards.
    grads = 4 * result["settings"]["parameters"]
    assert two["theory_ring_bytes_per_step"] == pytest.approx(grads)
    assert two["comm"]["per_op"]["all_reduce"]["logged_bytes_per_step"] >= grads
    assert 0.9 < two["ring_over_theory"] < 3
    assert all(j["torch_threads"] == [1] * j["world_size"] for j in result["jobs"])
    assert "scaling: 1 rank(s)" in proc.stdout
