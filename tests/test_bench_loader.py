"""Smoke test of benchmarks/loader.py: it builds both mixes, times every variant and writes cores per GPU (--quick).

The benchmark itself runs with `make bench`, never in `make test`.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
from conftest import REPO, run_cmd

# The benchmark scripts start and write their results (make test-bench; .ci/run runs it after make test).
pytestmark = pytest.mark.bench


def test_loader_bench_writes_cores_per_gpu(tmp_path):
    out = tmp_path / "loader.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "loader.py"), "--quick", "--cache", str(tmp_path / "c"),
                    "--out", str(out)], timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    # 2 mixes x 4 settings x 2 worker counts on the source sets, 3 prepared SD sets x 2 worker counts
    assert len(rows) == 22 and all(r["median_img_s"] > 0 and len(r["img_s"]) == 1 for r in rows)
    assert {r["setting"] for r in rows} == {"default", "crop native", "align_jpeg_quality 96", "Blur+JPEG 0.5"}
    today = [r for r in rows if (r["mix"], r["shards"], r["setting"]) == ("sd", "source", "default")]
    assert [r["vs_today"] for r in today] == [1.0, 1.0]
    # The Trainer's count on an H200: ViT-B/32 ~26 GFLOP, ViT-L/14 ~490 GFLOP per image (forward + backward)
    assert 25 < result["demand"]["ViT-B/32"]["gflop"] < 28 and 480 < result["demand"]["ViT-L/14"]["gflop"] < 500
    assert result["demand"]["ViT-L/14"]["gflop_attention"] > 0
    assert len(result["targets"]) == 4 and "**Cores per GPU**" in result["markdown"]
    assert "loader: SD v1.4 default (today)" in proc.stdout
    # the tables can be rendered again from the numbers alone
    rerun = run_cmd([sys.executable, str(REPO / "benchmarks" / "loader.py"), "--rerender", str(out)], timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(out.read_text())["markdown"] == result["markdown"]


def test_synthetic_images_are_distinct():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from synthetic_images import synthetic_image

    digests = {hashlib.sha256(np.asarray(synthetic_image(seed, (96, 64))).tobytes()).hexdigest() for seed in range(50)}
    assert len(digests) == 50
    assert np.array_equal(np.asarray(synthetic_image(7, (96, 64))), np.asarray(synthetic_image(7, (96, 64))))
    assert synthetic_image(3, (96, 64)).size == (96, 64)
