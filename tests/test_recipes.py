"""The paper recipes in ds_configs/recipes/ train through the CLI with the tiny CLIP swapped in
(their optimizer, scheduler, augmentation and strategy as written; test_ds_configs checks their
DeepSpeed JSON at 8 GPUs), and published.json's anchors load, validate and map to generator keys."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


RECIPES = sorted((REPO / "ds_configs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=ids(RECIPES))
def test_recipe_trains_a_step_with_tiny(recipe, tiny_shards, tmp_path):
    """Each recipe's own settings (optimizer, scheduler, augmentation, strategy) train through the CLI."""
    import json

    from ds_trainer import cli

    sets = [
        "model.model_name=tiny", f"data.shards={tiny_shards}", "data.train_generators=null", "data.num_workers=0",
        "data.eval_batch_size=16", "training.num_epochs=2", "training.warmup_epochs=0", "training.batch_size=8",
        f"training.checkpoint_dir={tmp_path / 'ckpt'}", f"logging.run_dir={tmp_path / 'run'}",
        "logging.tensorboard=false",
    ]  # fmt: skip
    argv = ["train", "--config", str(recipe)]
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] > 0 and all(r["train_loss"] == r["train_loss"] for r in rows)
