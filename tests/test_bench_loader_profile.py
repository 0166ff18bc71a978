"""Smoke test of benchmarks/loader_profile.py (--quick): every profiled variant's stages add up to its pass.

The profile itself runs with `make bench`, never in `make test`.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, run_cmd

pytestmark = pytest.mark.bench


def test_loader_profile_writes_stage_times_that_add_up(tmp_path):
    out = tmp_path / "profile.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "loader_profile.py"), "--quick", "--cache",
                    str(tmp_path / "c"), "--out", str(out)], timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["mix"], r["shards"], r["setting"]): r for r in result["rows"]}
    assert len(rows) == 5
    for row in rows.values():
        stages = row["stages_s"]
        assert row["images_decoded"] >= row["images_delivered"] == 2 * 8
        # exclusive times: none negative, and with `other` they are the pass's time
        assert all(v >= 0 for v in stages.values()), stages
        assert sum(stages.values()) == pytest.approx(row["seconds"], rel=1e-6)
        assert stages["to tensor"] > 0 and stages["collate"] > 0 and row["functions"]
    png = "PNG decode (pyspng)"
    # the source sets' fakes are PNGs; the prepared raw set has no file to decode, only .npy to read
    assert rows["sd", "source", "default"]["stages_s"][png] > 0
    raw = rows["sd", "prepared align 96 + resize 224, raw", "align_jpeg_quality 96"]["stages_s"]
    assert raw["raw .npy read"] > 0 and raw[png] == 0 and raw["JPEG decode (simplejpeg)"] == 0
    assert rows["sd", "source", "align_jpeg_quality 96"]["stages_s"]["JPEG round trip (align)"] > 0
    assert "stage: ms per image" in result["markdown"] and "cProfile" in result["markdown"]
