"""A linear probe's checkpoints (frozen tower, only head.* trains) evaluate and export like any other.

Regression: ZeRO 1 keeps fp32 masters of the trainable head only, so the consolidated state dict
lacked the frozen backbone.* weights and `eval`/`export` refused `best` and `epoch_1` with
"missing N keys (backbone.*)".
"""

from __future__ import annotations

import pytest
import torch
from conftest import write_config

from ds_trainer import cli
from ds_trainer.consolidate import rebuild_model, resolve_source


def train_probe(out, shards, zero_stage: int):
    cfg = write_config(
        out / "cfg.yaml",
        shards,
        model={"model_name": "tiny", "freeze_backbone": True},
        training={"num_epochs": 1, "warmup_epochs": 0},
        deepspeed={"zero_stage": zero_stage},
    )
    assert cli.main(["train", "--config", str(cfg)]) == 0
    return out


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, tiny_shards):
    return train_probe(tmp_path_factory.mktemp("probe_run"), tiny_shards, zero_stage=1)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_probe_checkpoint_rebuilds_at_every_zero_stage(tmp_path, tiny_shards, zero_stage):
    """ZeRO 2/3 record the frozen tower in DeepSpeed's frozen fragments, ZeRO 0 saves the whole module."""
    run = train_probe(tmp_path, tiny_shards, zero_stage)
    model = rebuild_model(resolve_source(run / "ckpt", "best"))
    assert sum(k.startswith("backbone.") for k in model.state_dict()) > 50


@pytest.mark.parametrize("tag", ["best", "epoch_1"])
def test_probe_checkpoint_rebuilds_with_its_frozen_tower(probe_run, tag):
    model = rebuild_model(resolve_source(probe_run / "ckpt", tag))
    # The frozen tower is the one the run trained with (the module file's copy), head included.
    saved = torch.load(probe_run / "ckpt" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    got = model.state_dict()
    tower = [k for k in got if k.startswith("backbone.")]
    assert len(tower) > 50
    assert all(torch.equal(got[k], saved["module"][k].float()) for k in tower)
    assert set(got) == set(saved["module"])


@pytest.mark.parametrize("tag", ["best", "epoch_1"])
def test_probe_checkpoint_evaluates_and_exports(probe_run, tiny_shards, tag, tmp_path, capsys):
    ckpt = probe_run / "ckpt"
    assert cli.main(["export", "--load-dir", str(ckpt), "--tag", tag, "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export").is_dir()
    assert (
        cli.main(["eval", "--load-dir", str(ckpt / tag), "--out", str(tmp_path / "ev.json"), "--bootstrap", "0"]) == 0
    )
