"""Layer 4: the embedded demo end to end (what `make demo` runs) really learns."""

import json

import pytest
from conftest import run_cmd

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_demo_config_reaches_auc_090_on_two_ranks(tmp_path):
    from ds_trainer.data import make_demo_shards

    shards = tmp_path / "demo"
    make_demo_shards(shards, progress=False)
    out = run_cmd(
        [
            "./launch.sh",
            "--config",
            "ds_configs/demo.yaml",
            "--set",
            f"data.shards={shards}",
            "--set",
            f"logging.run_dir={tmp_path / 'run'}",
            "--set",
            f"training.checkpoint_dir={tmp_path / 'ckpt'}",
        ],
        DS_TRAINER_CPU_RANKS="2",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert rows[-1]["val_auc"] >= 0.90
    assert rows[-1]["val_samples"] == 400
    assert "Val Loss:" in out.stdout and "Saving checkpoint to:" in out.stdout
