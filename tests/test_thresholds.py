"""Threshold modes: 0.5, a fixed cut, calibrated (fitted on the training generators' holdout, stored with
the checkpoint, reused by eval, export and predict) and the labelled oracle.

Pure checks of the fits against brute force first; then one holdout run through the CLI whose checkpoint
is evaluated on its val split and on a copy with every test label flipped (the calibrated threshold
must not move), exported and predicted with.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, launch_env, write_config

from ds_trainer import calibration, cli
from ds_trainer.calibration import Calibration
from ds_trainer.checkpoint import MARKER
from ds_trainer.config import build_config
from ds_trainer.errors import ConfigError
from ds_trainer.eval_thresholds import parse_modes, threshold_tables, validation_row
from ds_trainer.metrics import binary_metrics, per_generator_metrics


def synthetic(n: int = 400, seed: int = 0, shift: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """P(AI) of a detector overconfident by a factor of 2: labels drawn from sigmoid(l), scores sigmoid(2 l)."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(0, shift, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return 1 / (1 + np.exp(-2 * logit)), y


def brute_force_cut(s: np.ndarray, y: np.ndarray, balanced: bool) -> float:
    """The best (balanced) accuracy over every cut between two sorted scores, by enumeration."""
    u = np.unique(s)
    cuts = np.concatenate([[u[0] - 1e-3], (u[1:] + u[:-1]) / 2, [u[-1] + 1e-3]])

    def quality(t: float) -> float:
        pred = s >= t
        if balanced:
            return 0.5 * (pred[y == 1].mean() + (~pred[y == 0]).mean())
        return float((pred == (y == 1)).mean())

    return max(quality(t) for t in cuts)


@pytest.mark.unit
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("balanced", [True, False])
def test_the_threshold_reaches_the_best_accuracy_brute_force_finds(seed, balanced):
    s, y = synthetic(200, seed, shift=0.6)
    y[:30] = 0  # unbalanced classes: balanced and plain accuracy pick different cuts
    t = calibration.best_threshold(s, y, balanced=balanced)
    pred = s >= t
    got = 0.5 * (pred[y == 1].mean() + (~pred[y == 0]).mean()) if balanced else float((pred == (y == 1)).mean())
    assert got == pytest.approx(brute_force_cut(s, y, balanced), abs=1e-12)
    assert not np.isin(t, s)  # halfway between two scores, never on one


@pytest.mark.unit
def test_separable_scores_get_the_cut_between_the_classes_nearest_one_half():
    s = np.array([0.01, 0.02, 0.03, 0.9, 0.95, 0.99])
    y = np.array([0, 0, 0, 1, 1, 1])
    assert calibration.best_threshold(s, y, balanced=True) == pytest.approx((0.03 + 0.9) / 2)


@pytest.mark.unit
def test_the_temperature_minimises_the_nll_and_undoes_overconfidence():
    s, y = synthetic(4000, 3)
    t = calibration.fit_temperature(s, y)
    z = calibration.logits(s)

    def nll(temp: float) -> float:
        return float(np.mean(np.logaddexp(0, -np.where(y == 1, 1, -1) * z / temp)))  # -log sigmoid(+-z/T)

    grid = np.exp(np.linspace(np.log(0.1), np.log(10), 2001))
    assert nll(t) <= min(nll(g) for g in grid) + 1e-9
    assert 1.6 < t < 2.4  # the logits were scaled by 2
    scaled = calibration.temperature_scale(s, t)
    before, after = binary_metrics(s, y), binary_metrics(scaled, y, calibration.temperature_scale([0.5], t)[0])
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    for k in ("auc", "ap", "acc", "eer"):  # a monotone map, the cut mapped alike: nothing else moves
        assert after[k] == pytest.approx(before[k]), k


@pytest.mark.unit
def test_the_oracle_is_each_generators_own_best_accuracy():
    s1, y1 = synthetic(100, 4, shift=0.5)
    s2, y2 = synthetic(100, 5, shift=0.5)
    s2 = s2 * 0.5  # a generator whose fakes score low: its best cut is far from the other's
    s, y, g = np.concatenate([s1, s2]), np.concatenate([y1, y2]), ["a"] * 100 + ["b"] * 100
    cuts = calibration.oracle_thresholds(s, y, g)
    table = per_generator_metrics(s, y, g, None, cuts)
    assert table["a"]["acc"] == pytest.approx(brute_force_cut(s1, y1, balanced=False))
    assert table["b"]["acc"] == pytest.approx(brute_force_cut(s2, y2, balanced=False))
    assert table["b"]["acc"] >= per_generator_metrics(s, y, g)["b"]["acc"]  # at least 0.5's accuracy


@pytest.mark.unit
def test_a_one_class_holdout_is_refused_by_the_fit():
    with pytest.raises(ValueError, match="one class only"):
        calibration.fit([0.2, 0.7], [1, 1], "the holdout")


@pytest.mark.unit
@pytest.mark.parametrize(
    "raw, match",
    [
        ([0.5], "not a mapping"),
        ({"threshold": 0.5}, "malformed"),
        ({"threshold": 1.5, "temperature": 1, "samples": 3, "fitted_on": "x"}, "not within"),
        ({"threshold": 0.5, "temperature": 0, "samples": 3, "fitted_on": "x"}, "positive"),
    ],
)
def test_a_malformed_stored_calibration_is_named(raw, match):
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict(raw, "ckpt/epoch_1")


@pytest.mark.unit
def test_threshold_flags_parse_and_refuse():
    assert parse_modes(["calibrated,oracle", "0.3", "0.5", "oracle"]) == ["calibrated", "oracle", 0.3]
    for bad in ("1.5", "best", "0", ""):
        with pytest.raises(ConfigError, match="--threshold"):
            parse_modes([bad])


@pytest.mark.unit
def test_calibrated_needs_a_holdout_in_the_config():
    with pytest.raises(ConfigError, match="holdout_fraction"):
        build_config({"data": {"threshold": "calibrated"}})
    assert build_config({"data": {"threshold": "calibrated", "holdout_fraction": 0.1}}).data.threshold == "calibrated"
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        build_config({"data": {"threshold": 1.0}})


@pytest.mark.unit
def test_a_calibrated_validation_row_is_scored_at_the_fitted_cut_on_scaled_scores():
    s, y = synthetic(300, 6, shift=0.7)
    g = ["a" if i % 2 else "b" for i in range(300)]
    cal = calibration.fit(s, y, "holdout")
    data = build_config({"data": {"threshold": "calibrated", "holdout_fraction": 0.2}}).data
    row = validation_row(data, {"score": s, "label": y, "generator": g}, cal, None)
    assert row["val_threshold"] == cal.threshold and row["val_temperature"] == cal.temperature
    at_cut = binary_metrics(s, y, cal.threshold)
    assert row["val_acc"] == pytest.approx(at_cut["acc"]) and row["val_real_acc"] == pytest.approx(at_cut["real_acc"])
    assert row["val_mean_ece"] == pytest.approx(
        np.mean([binary_metrics(cal.calibrate(s)[np.asarray(g) == n], y[np.asarray(g) == n])["ece"] for n in "ab"])
    )
    # at the default 0.5 the row only says so: the evaluation pass's numbers stand
    fixed = validation_row(build_config({}).data, {"score": s, "label": y, "generator": g}, None, None)
    assert fixed == {"val_threshold": 0.5}


@pytest.mark.unit
def test_threshold_tables_label_the_oracle_and_keep_the_cuts():
    s, y = synthetic(200, 7)
    g = ["a"] * 100 + ["b"] * 100
    cal = calibration.fit(s, y, "holdout", epoch=3)
    blocks = threshold_tables(["calibrated", "oracle", 0.3], {"score": s, "label": y, "generator": g}, cal, None)
    assert list(blocks) == ["calibrated", "oracle", "0.3"]
    assert blocks["oracle"]["oracle"] is True and "upper bound" in blocks["oracle"]["label"]
    assert blocks["calibrated"]["oracle"] is False and blocks["calibrated"]["threshold"] == cal.threshold
    assert blocks["0.3"]["generators"]["a"]["acc"] == pytest.approx(binary_metrics(s[:100], y[:100], 0.3)["acc"])


# ------------------------------------------------------------------ a holdout run, end to end
def flipped_copy(shards, dst, split: str):
    """`shards` with every label of `split` flipped (same images, same counts per shard)."""
    shutil.copytree(shards, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["split"] != split:
            continue
        path = dst / entry["path"]
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for m, data in members:
                if m.name.endswith(".cls"):
                    data = b"0" if data.strip() == b"1" else b"1"
                    m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
        path.write_bytes(out.getvalue())
    return dst


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory, tiny_shards):
    tmp = tmp_path_factory.mktemp("holdout_run")
    cfg = write_config(tmp / "cfg.yaml", tiny_shards, data={"holdout_fraction": 0.25, "threshold": "calibrated"},
                       training={"num_epochs": 1, "warmup_epochs": 0})  # fmt: skip
    assert cli.main(["train", "--config", str(cfg)]) == 0
    return tmp, cfg


def eval_json(tmp, cfg, *extra):
    out = tmp / f"eval_{len(list(tmp.glob('eval_*.json')))}.json"
    args = ["eval", "--config", str(cfg), "--load-dir", str(tmp / "ckpt"), "--out", str(out), "--bootstrap", "0"]
    assert cli.main([*args, *extra]) == 0
    return json.loads(out.read_text())


def test_a_holdout_run_stores_the_calibration_its_row_reports(holdout_run):
    tmp, _ = holdout_run
    row = json.loads((tmp / "run" / "metrics.jsonl").read_text().splitlines()[0])
    marker = json.loads((tmp / "ckpt" / "epoch_1" / MARKER).read_text())
    stored = marker["calibration"]
    assert row["val_threshold"] == row["val_calibrated_threshold"] == stored["threshold"]
    assert row["val_temperature"] == stored["temperature"] and stored["epoch"] == 1
    assert stored["samples"] == row["val_samples"] == 40 and "holdout (0.25) of split train" in stored["fitted_on"]
    assert 0 < stored["threshold"] < 1 and stored["temperature"] > 0


def test_eval_reuses_the_stored_threshold_whatever_the_test_labels(holdout_run, tmp_path):
    tmp, cfg = holdout_run
    stored = json.loads((tmp / "ckpt" / "epoch_1" / MARKER).read_text())["calibration"]
    plain = eval_json(tmp, cfg, "--threshold", "oracle", "--report", str(tmp_path / "report"))  # + calibrated
    page = (tmp_path / "report" / "report.html").read_text()
    assert "id='threshold-0-oracle'" in page and "oracle (oracle: upper bound)" in page
    assert "id='threshold-0-calibrated'" in page and f"{stored['threshold']:.4f}" in page
    flipped_root = flipped_copy(Path(plain["shards"]), tmp_path / "flipped", "val")
    flipped = eval_json(tmp, cfg, "--set", f"data.shards={flipped_root}", "--threshold", "oracle")
    for result in (plain, flipped):
        block = result["thresholds"]["calibrated"]
        assert (block["threshold"], block["temperature"]) == (stored["threshold"], stored["temperature"])
        assert result["calibration"] == stored
        assert list(result["thresholds"]) == ["oracle", "calibrated"]
    # the flipped labels do change the scores at that threshold, and move the oracle's cuts
    p, f = plain["thresholds"]["calibrated"]["generators"], flipped["thresholds"]["calibrated"]["generators"]
    assert p["mean"]["acc"] == pytest.approx(1 - f["mean"]["acc"])
    assert plain["thresholds"]["oracle"]["thresholds"] != flipped["thresholds"]["oracle"]["thresholds"]
    # the calibrated table is the one recomputed from the predictions at the stored cut
    pred = plain["predictions"]
    names = [pred["generators"][i] for i in pred["generator"]]
    cal = Calibration.from_dict(stored, "x")
    again = per_generator_metrics(cal.calibrate(pred["score"]), np.asarray(pred["label"]), names, None,
                                  float(cal.calibrate([cal.threshold])[0]))  # fmt: skip
    assert again["mean"]["acc"] == pytest.approx(p["mean"]["acc"], abs=1e-3)


def test_export_and_predict_decide_at_the_calibrated_threshold(holdout_run, tmp_path):
    tmp, _ = holdout_run
    out = tmp_path / "export"
    assert cli.main(["export", "--load-dir", str(tmp / "ckpt"), "--out", str(out)]) == 0
    decision = json.loads((out / "ds_trainer_export.json").read_text())["decision"]
    stored = json.loads((tmp / "ckpt" / "epoch_1" / MARKER).read_text())["calibration"]
    assert decision["mode"] == "calibrated" and decision["threshold"] == stored["threshold"]
    from PIL import Image

    images = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    proc = subprocess.run([sys.executable, "-m", "ds_trainer", "predict", "--json", "--model", str(out), *images],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in json.loads(proc.stdout):
        assert r["ai"] == (r["p_ai"] >= stored["threshold"])
        expect = calibration.temperature_scale([r["p_ai"]], stored["temperature"])[0]
        assert r["p_ai_calibrated"] == pytest.approx(expect)
        assert math.isfinite(r["p_ai_calibrated"])


def test_calibrated_on_a_checkpoint_without_a_holdout_is_refused(one_epoch_run, capsys):
    code = cli.main(["eval", "--load-dir", str(one_epoch_run / "ckpt"), "--threshold", "calibrated"])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds no calibrated threshold" in err and "data.holdout_fraction" in err
