"""Smoke tests of the GPU suite's parts on this CPU, and of RESULTS.md's rendering.

The suite itself needs a CUDA GPU (benchmarks/gpu_suite.sh); here gpu_bench.py runs its tiny model
on the CPU so that the code path (model from a config, both loaders, MFU, memory) is exercised.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO, run_cmd

# The benchmark scripts start and write their results (make test-bench; .ci/run runs it after make test).
pytestmark = pytest.mark.bench


def test_gpu_bench_runs_both_loaders_on_cpu(tmp_path):
    out = tmp_path / "gpu_suite.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--models", "tiny", "--loaders",
                    "memory,stream", "--steps", "2", "--skip", "1", "--cpu", "--workers", "1", "--out", str(out)],
                   timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["loader"]) for r in rows] == [("tiny", "memory"), ("tiny", "stream")]
    for r in rows:
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["gflop_per_image"] > 0
        assert r["peak_memory_gib"] > 0 and r["peak_memory_kind"] == "peak RSS" and r["precision"] == "fp32"
    assert "| tiny CLIP | stream |" in result["markdown"]
    assert result["summary"].startswith("tiny CLIP memory")


def test_gpu_suite_refuses_without_a_gpu():
    if torch.cuda.is_available():
        return  # the refusal is what this CPU machine checks; a GPU machine runs the suite itself
    proc = run_cmd(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], timeout=120)
    assert proc.returncode == 2
    assert "sees no CUDA GPU" in proc.stderr + proc.stdout


def test_results_md_is_rendered_from_the_result_files(tmp_path):
    results, notes = tmp_path / "results", tmp_path / "notes"
    results.mkdir()
    notes.mkdir()
    (results / "step_overhead.json").write_text(json.dumps({
        "command": "python benchmarks/step_overhead.py", "date": "2026-11-30", "summary": "trainer/engine 1.01",
        "markdown": "| a | b |\n|---|---|\n| 1 | 2 |", "machine": {"processor": "Some CPU", "cpus": 2, "torch": "2.13.0"},
    }))  # fmt: skip
    (notes / "step_overhead.md").write_text("Profile: nothing left.")
    out = tmp_path / "RESULTS.md"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "write_results.py"), "--results", str(results),
                    "--notes", str(notes), "--out", str(out)], timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    section = text.split("## 1. Trainer overhead and MFU")[1].split("## 2.")[0]
    assert "`python benchmarks/step_overhead.py` — 2026-11-30, Some CPU, 2 cores" in section
    assert "**trainer/engine 1.01**" in section and "| 1 | 2 |" in section and "Profile: nothing left." in section
    # A benchmark without a result is listed as not run, with the reason.
    assert "## 8. GPU suite" in text and "not run: no GPU has been lent" in text
    assert "## 5. Memory per ZeRO stage\n\n_run `make bench`._" in text
