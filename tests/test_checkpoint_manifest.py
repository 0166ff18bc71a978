"""Layer 1: the checkpoint manifest decides what is complete; damaged tags are skipped on resume."""

import json

import pytest

from ds_trainer import checkpoint
from ds_trainer.errors import CheckpointError

pytestmark = pytest.mark.unit


def fake_tag(root, tag, step, files):
    d = root / tag
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    manifest = {"epoch": step, "global_step": step, "files": {n: len(b) for n, b in files.items()}}
    (d / checkpoint.MARKER).write_text(json.dumps(manifest))
    return d


def test_truncated_or_missing_rank_file_makes_a_tag_incomplete_and_resume_falls_back(tmp_path, caplog):
    fake_tag(tmp_path, "epoch_1", 8, {"mp_rank_00_model_states.pt": b"a" * 10, "zero_pp_rank_1_optim.pt": b"b" * 5})
    newer = fake_tag(
        tmp_path, "epoch_2", 16, {"mp_rank_00_model_states.pt": b"a" * 10, "zero_pp_rank_1_optim.pt": b"b" * 5}
    )
    (tmp_path / "latest").write_text("epoch_2")
    assert checkpoint.resolve(tmp_path) == (tmp_path, "epoch_2")

    (newer / "zero_pp_rank_1_optim.pt").write_bytes(b"b" * 2)  # a rank's file cut short
    assert checkpoint.problems(newer) == ["zero_pp_rank_1_optim.pt is 2 bytes, the manifest says 5"]
    assert checkpoint.resolve(tmp_path) == (tmp_path, "epoch_1")
    assert "incomplete" in caplog.text and "epoch_2" in caplog.text

    (newer / "zero_pp_rank_1_optim.pt").unlink()
    assert checkpoint.problems(newer) == ["missing zero_pp_rank_1_optim.pt"]
    with pytest.raises(CheckpointError, match="is damaged: missing zero_pp_rank_1_optim.pt"):
        checkpoint.resolve(newer)  # asked for by name: an error, not a silent substitute


def test_a_directory_without_any_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "epoch_1").mkdir()  # a save that never finished: no manifest
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*found: epoch_1"):
        checkpoint.resolve(tmp_path)


def test_preemption_tags_are_dropped_once_an_epoch_supersedes_them(tmp_path):
    fake_tag(tmp_path, "step_5", 5, {"f": b"x"})
    fake_tag(tmp_path, "step_20", 20, {"f": b"x"})
    fake_tag(tmp_path, "epoch_2", 16, {"f": b"x"})
    (tmp_path / "latest").write_text("epoch_2")
    dropped = checkpoint.drop_preemption_tags(tmp_path, before_step=16)
    assert [d.name for d in dropped] == ["step_5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_2", "latest", "step_20"]


def test_config_hash_ignores_paths_and_logging():
    a = {
        "model": {"model_name": "tiny"},
        "training": {"learning_rate": 1e-3, "checkpoint_dir": "a"},
        "logging": {"run_dir": "x"},
    }
    b = {
        "model": {"model_name": "tiny"},
        "training": {"learning_rate": 1e-3, "checkpoint_dir": "b"},
        "logging": {"run_dir": "y"},
    }
    c = {"model": {"model_name": "tiny"}, "training": {"learning_rate": 2e-3, "checkpoint_dir": "a"}}
    assert checkpoint.config_hash(a) == checkpoint.config_hash(b) != checkpoint.config_hash(c)
