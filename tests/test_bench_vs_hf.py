"""Smoke test of benchmarks/vs_hf_trainer.py: both contenders launch, train and report on a tiny setting.

The benchmark itself runs with `make bench`, never in `make test`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cmd

# The benchmark scripts start and write their results (make test-bench; .ci/run runs it after make test).
pytestmark = pytest.mark.bench


@pytest.mark.distributed
def test_vs_hf_trainer_writes_both_rates(tmp_path):
    out = tmp_path / "vs_hf_trainer.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "vs_hf_trainer.py"), "--hidden", "64", "--layers", "1",
                    "--image-size", "32", "--batch-size", "4", "--steps", "3", "--world-sizes", "1", "--repeats", "1",
                    "--out", str(out)], timeout=480)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"settings", "per_world_size", "raw", "summary", "markdown", "machine"} <= set(result)
    assert result["settings"]["world_sizes"] == [1] and result["settings"]["zero_stage"] == 1
    one = result["per_world_size"]["1"]
    for contender in ("ds_trainer", "hf"):
        assert one["samples_per_s"][contender]["median"] > 0
        assert one["time_to_first_step_s"][contender]["median"] > 0
        (run,) = result["raw"]["1"][contender]
        assert run["samples_per_s"] > 0 and len(run["step_time_s"]) == 2
    assert one["ratio"]["median"] > 0 and one["ratio_median_step"]["median"] > 0
    # Both optimizers over the same parameter groups (no decay on biases/norms).
    assert one["param_groups"] == {"ds_trainer": 2, "hf": 2}
    # HF trained with the very JSON ds_trainer derived (accelerate only silences steps_per_print).
    assert one["ds_config"]["ds_trainer_wrote_the_derived_one"]
    assert all(d.startswith("steps_per_print") for d in one["ds_config"]["differences"])
    assert "| world size |" in result["markdown"] and "vs_hf_trainer: 1 rank: ds_trainer/HF" in proc.stdout
    # Neither launch left DeepSpeed's shared-memory all-reduce buffers behind.
    for contender in ("ds_trainer", "hf"):
        port = result["raw"]["1"][contender][0]["master_port"]
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.distributed
def test_vs_hf_trainer_defaults_on_real_shards(tmp_path):
    """--defaults: launch.sh with YAML defaults vs HF's Trainer with default TrainingArguments, same decoded images."""
    from ds_trainer.data import make_demo_shards

    shards = tmp_path / "demo"
    make_demo_shards(shards, progress=False, train_per_class=24, val_per_class=4)  # 96 training images
    out = tmp_path / "vs_hf_trainer_defaults.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "vs_hf_trainer.py"), "--defaults", "--shards",
                    str(shards), "--hidden", "64", "--layers", "1", "--patch-size", "32", "--image-size", "64",
                    "--batch-size", "8", "--warmup-steps", "2", "--world-sizes", "1,2", "--repeats", "1",
                    "--out", str(out)], timeout=480)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["defaults"] and result["settings"]["train_images"] == 96
    one = result["per_world_size"]["1"]
    assert one["ratio"]["median"] > 0 and isinstance(one["meets_1_2x"], bool)
    for contender in ("ds_trainer", "hf"):
        (run,) = result["raw"]["1"][contender]
        assert run["steps"] == 96 // 8 and run["samples_per_s"] > 0  # one epoch over the same images
    hf = result["raw"]["1"]["hf"][0]
    assert hf["dataloader_num_workers"] == 0 and hf["optimizer"].startswith("AdamW")  # HF's own defaults
    # 2 ranks: HF's DDP is one world of 2 (torchrun on a CPU without use_cpu gave 2 worlds of 1, each
    # training the whole epoch), so each rank takes half the steps of the 1-rank epoch
    for contender in ("ds_trainer", "hf"):
        (run,) = result["raw"]["2"][contender]
        assert run["steps"] == 96 // 16 and run["samples_per_s"] > 0
    assert result["raw"]["2"]["hf"][0]["world_size"] == 2
    for w in ("1", "2"):  # the share of the time each step waited for its batch, both contenders
        assert all(
            0 <= result["per_world_size"][w]["data_wait_fraction"][c]["median"] < 1 for c in ("ds_trainer", "hf")
        )
    assert "| world size |" in result["markdown"] and "vs_hf_trainer_defaults: 1 rank" in proc.stdout
    assert "2 ranks: ds_trainer/HF" in proc.stdout


@pytest.mark.distributed
def test_preemption_poll_ab_writes_both_arms(tmp_path):
    out = tmp_path / "preemption_poll.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "preemption_poll.py"), "--hidden", "64", "--layers", "1",
                    "--image-size", "32", "--batch-size", "4", "--steps", "6", "--warmup-steps", "2", "--repeats", "1",
                    "--out", str(out)], timeout=480)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["world_size"] == 2 and result["settings"]["order"] == [
        "poll_sync_r0",
        "poll_on_r0",
        "poll_off_r0",
    ]
    for arm in ("sync", "on", "off"):
        (run,) = result["raw"][arm]
        assert len(run["poll_s"]) == 6 and run["median_step_s"] > 0  # one timed poll per optimizer step
    assert result["ratio_on_over_off"]["median"] > 0 and isinstance(result["above_1_percent"], bool)
    assert "| poll |" in result["markdown"] and "preemption_poll: 2 ranks" in proc.stdout


def test_defaults_sd_mix_set_has_both_splits_of_distinct_images(tmp_path, monkeypatch):
    """--defaults' SD v1.4-like set: train and val, half PNG fakes of the SD side, half JPEG reals, no image twice."""
    import hashlib
    import tarfile

    from benchmarks.peer import defaults

    monkeypatch.setattr(defaults, "SD_TRAIN", 8)
    monkeypatch.setattr(defaults, "SD_VAL", 4)
    monkeypatch.setattr(defaults, "SD_FAKE_SIDE", 64)
    shards = defaults.sd_mix_shards(tmp_path, workers=1)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["counts"]["sd"]["train"] == {"ai": 4, "nature": 4, "total": 8}
    assert manifest["counts"]["sd"]["val"] == {"ai": 2, "nature": 2, "total": 4}
    digests, suffixes = set(), []
    for entry in manifest["shards"]:
        with tarfile.open(shards / entry["path"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".png", ".jpg")):
                    suffixes.append(member.name.rsplit(".", 1)[1])
                    digests.add(hashlib.sha256(tar.extractfile(member).read()).hexdigest())
    assert sorted(suffixes) == ["jpg"] * 6 + ["png"] * 6 and len(digests) == 12
    assert not (tmp_path / f"{shards.name}-src").exists()  # the image tree is removed once sharded
    assert defaults.sd_mix_shards(tmp_path, workers=1) == shards  # built once, then reused
