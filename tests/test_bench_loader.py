"""Smoke test of benchmarks/loader.py: it builds both mixes, times every variant and writes cores per GPU (--quick).

The benchmark itself runs with `make bench`, never in `make test`.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
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
    # today's baseline (SD, before item 2) + 2 mixes x 4 settings on the source sets + 3 prepared SD sets and 1
    # prepared Midjourney set, each at 2 worker counts
    assert len(rows) == 26 and all(r["median_img_s"] > 0 and len(r["img_s"]) == 1 for r in rows)
    settings = {"default", "crop native", "align_jpeg_quality 96", "Blur+JPEG 0.5", "default, before item 2"}
    assert {r["setting"] for r in rows} == settings
    today = [r for r in rows if (r["mix"], r["shards"], r["setting"]) == ("sd", "source", "default, before item 2")]
    assert [r["vs_today"] for r in today] == [1.0, 1.0]
    # every target is measured against it: none is left as "baseline"
    assert [t[2] for t in result["targets"] if t[2] not in ("met", "**missed**")] == []
    # The Trainer's count on an H200: ViT-B/32 ~26 GFLOP, ViT-L/14 ~490 GFLOP per image (forward + backward)
    assert 25 < result["demand"]["ViT-B/32"]["gflop"] < 28 and 480 < result["demand"]["ViT-L/14"]["gflop"] < 500
    assert result["demand"]["ViT-L/14"]["gflop_attention"] > 0
    assert len(result["targets"]) == 5 and "**Cores per GPU**" in result["markdown"]
    assert "loader: SD v1.4 default " in proc.stdout and "(1 worker; today " in proc.stdout
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


def test_todays_baseline_decodes_with_pillow_and_ships_floats():
    """The baseline row is the loader as issue 14 found it: no faster decoder, float batches from the worker
    (the same model inputs as the uint8 path's after normalisation)."""
    import random

    from PIL import Image

    from ds_trainer.config import DataSection
    from ds_trainer.data.fast_decode import fast_formats
    from ds_trainer.data.transforms import Preprocess, normalize

    sys.path.insert(0, str(REPO / "benchmarks"))
    import loader

    data = DataSection(shards="unused")
    before, now = loader.before_item2(data), Preprocess.from_config(data, draft=data.jpeg_draft, uint8=True)
    assert fast_formats(before) == frozenset() and fast_formats(now) == frozenset({"JPEG", "PNG"})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    floats = before(img, label=1, train=True, rng=random.Random("k"))
    pixels = now(img, label=1, train=True, rng=random.Random("k"))
    assert floats.dtype.is_floating_point and pixels.dtype == torch.uint8
    assert torch.equal(floats, normalize(pixels))
