"""The paper recipes in ds_configs/recipes/ train through the CLI with the tiny CLIP swapped in
(their optimizer, scheduler, augmentation and strategy as written; test_ds_configs checks their
DeepSpeed JSON at 8 GPUs), and published.json's anchors load, validate and map to generator keys."""

from __future__ import annotations

import json
import re
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


# ---------------------------------------------------------------------------------------------- published.json
@pytest.mark.unit
def test_published_file_loads_with_every_anchor_the_recipes_name():
    from ds_trainer.published import GENIMAGE_GENERATORS, load_published

    entries = load_published()
    univfd = {n: e for n, e in entries.items() if e.method.startswith("UnivFD")}
    assert sorted(e.mean_printed for e in univfd.values()) == [73.3, 79.45, 88.8]  # three papers, three entries
    assert all(e.numbers_by == "re-implementation" for e in univfd.values())
    effort = entries["effort"]
    assert effort.numbers_by == "authors" and effort.mean_printed == 91.1
    assert effort.mean_computed == pytest.approx(90.0875)  # its cells, not its printed mean
    assert list(effort.accuracy) == list(GENIMAGE_GENERATORS)
    assert effort.accuracy["stable_diffusion_v_1_4"] == 99.8 and effort.accuracy["BigGAN"] == 77.6
    assert entries["univfd_drct"].mean_computed == pytest.approx(79.445)
    assert entries["iapl"].mean_ap_printed == 99.5
    recipes = {p.stem for p in (REPO / "ds_configs" / "recipes").glob("*.yaml")} | {"effort_vitl14"}
    assert {e.recipe for e in entries.values() if e.recipe} <= recipes


@pytest.mark.unit
@pytest.mark.parametrize(
    "label, key",
    [("Midjourney", "Midjourney"), ("SD1.4", "stable_diffusion_v_1_4"), ("SD v1.5", "stable_diffusion_v_1_5"),
     ("stable_diffusion_v_1_4", "stable_diffusion_v_1_4"), ("glide", "glide"), ("BigGAN", "BigGAN"),
     ("wukong", "wukong"), ("demo_nearest", None)],
)  # fmt: skip
def test_paper_labels_map_to_genimage_generator_keys(label, key):
    from ds_trainer.published import generator_key

    assert generator_key(label) == key


GOOD = {"method": "m", "paper": "p", "source": "s", "numbers_by": "authors", "accuracy": {"ADM": 50.0}}


@pytest.mark.unit
@pytest.mark.parametrize(
    "tree, message",
    [
        ({"version": 2, "entries": {"a": GOOD}}, 'expected {"version": 1'),
        ({"version": 1, "entries": {}}, "has no entries"),
        ({"version": 1, "entries": {"a": {**GOOD, "numbers_by": "me"}}}, "numbers_by must be one of"),
        ({"version": 1, "entries": {"a": {**GOOD, "accuracy": {"DALLE": 50}}}}, "unknown generator 'DALLE'"),
        ({"version": 1, "entries": {"a": {**GOOD, "accuracy": {"ADM": 150}}}}, "percentage in [0, 100]"),
        ({"version": 1, "entries": {"a": {**GOOD, "accuracy": {"ADM": "x"}}}}, "must be a number"),
        ({"version": 1, "entries": {"a": {**GOOD, "accuracy": {"SD1.4": 1, "sd14": 2}}}}, "given twice"),
        ({"version": 1, "entries": {"a": {**GOOD, "source": ""}}}, "entries.a.source is required"),
        ({"version": 1, "entries": {"a": {**GOOD, "acc": {}}}}, "unknown key 'acc'"),
        ({"version": 1, "entries": {"a": {k: v for k, v in GOOD.items() if k != "accuracy"}}}, "give accuracy"),
    ],
)
def test_bad_published_file_is_refused(tmp_path, tree, message):
    from ds_trainer.errors import DataError
    from ds_trainer.published import load_published

    path = tmp_path / "published.json"
    path.write_text(json.dumps(tree))
    with pytest.raises(DataError, match=re.escape(message)):
        load_published(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_published(path)


# ---------------------------------------------------------------------------------------------- report --reference
@pytest.mark.unit
def test_reference_report_puts_the_run_beside_the_paper(tmp_path, capsys):
    from test_report import fake_eval

    from ds_trainer import cli
    from ds_trainer.published import reference
    from ds_trainer.report import load_eval
    from ds_trainer.report_reference import compare

    ev = fake_eval(tmp_path / "ev.json", shift=0.3)  # generators adm, biggan, midjourney
    assert cli.main(["report", "--eval", str(ev), "--out", str(tmp_path / "rep"), "--reference", "effort"]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<table class='reference'" in page and "<table class='published'" in page  # both tables
    assert "<th>difference</th>" in page
    assert (tmp_path / "rep" / "reference.png").stat().st_size > 1000 and "id='fig-reference'" in page

    rows = {r.generator: r for r in compare(load_eval(ev), reference("effort"))}
    run_adm = json.loads(ev.read_text())["generators"]["adm"]["acc"] * 100
    assert rows["adm"].paper == 78.7 and rows["adm"].run == pytest.approx(run_adm)
    assert rows["adm"].diff == pytest.approx(run_adm - 78.7)
    assert f"{run_adm - 78.7:+.2f}" in page
    assert rows["stable_diffusion_v_1_4"].run is None and rows["stable_diffusion_v_1_4"].diff is None
    assert rows["mean"].paper == pytest.approx(90.0875)  # computed from cells, not the printed 91.1


@pytest.mark.unit
def test_unknown_reference_is_refused_listing_the_known_ones(tmp_path, capsys):
    from test_report import fake_eval

    from ds_trainer import cli

    ev = fake_eval(tmp_path / "ev.json", shift=0.3)
    code = cli.main(["report", "--eval", str(ev), "--out", str(tmp_path / "rep"), "--reference", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "no published reference 'nope'; known: c2p_clip, effort," in err
    assert not (tmp_path / "rep").exists()
