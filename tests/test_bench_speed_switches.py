"""Smoke test of benchmarks/speed_switches.py: it starts, times every switch and writes its result (tiny setting).

The benchmark itself runs with `make bench`, never in `make test`.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, run_cmd

# The benchmark scripts start and write their results (make test-bench; .ci/run runs it after make test).
pytestmark = pytest.mark.bench


def test_speed_switches_writes_its_ratios(tmp_path):
    out = tmp_path / "speed_switches.json"
    # --warm-cache: inductor's usual cache, so a rerun does not pay the compilation again.
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "speed_switches.py"), "--steps", "1", "--repeats", "2",
                    "--hidden", "64", "--layers", "1", "--image-size", "32", "--batch-size", "4", "--cpu",
                    "--warm-cache", "--out", str(out)], timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speed_switches: step time vs default" in proc.stdout
    result = json.loads(out.read_text())
    contenders = result["contenders"]
    assert set(contenders) == {"default", "attention=eager", "checkpointing=on", "compile=on",
                               "optimizer=torch-fused", "optimizer=ds-fused", "optimizer=ds-cpu"}  # fmt: skip
    for name, c in contenders.items():
        assert c["step_time_s"]["n"] == 2 and c["step_time_s"]["min"] > 0, name
        assert c["step_time_ratio"]["median"] > 0 and c["optimizer_step_s"]["min"] > 0, name
        assert c["memory"]["after_forward_mib"] > 0 and c["memory"]["peak_mib"] >= c["memory"]["after_forward_mib"]
    # Checkpointing keeps only the layer inputs after forward; the measurement must see that.
    assert contenders["checkpointing=on"]["after_forward_ratio"] < 0.7
    assert contenders["compile=on"]["compile_s"] > 0
    engines = result["engine_optimizers"]
    assert engines["offload_optimizer=none"].endswith("FusedAdam")
    assert engines["offload_optimizer=cpu"].endswith("DeepSpeedCPUAdam")
    assert result["markdown"].startswith("| switch |") and result["settings"]["precision"] == "fp32"
