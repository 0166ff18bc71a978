"""`ds-trainer eval --shards A --shards B`: one checkpoint on several shard sets, the cross-dataset table.

The pure parts (parsing, the means) run on synthetic numbers; the CLI test trains the tiny CLIP for
one epoch in this process, shards a binary-folders tree beside the demo set and evaluates both.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_config
from test_data_layouts import binary_tree
from test_report import chromium, run_chromium

from ds_trainer import cli
from ds_trainer.data import shard_genimage
from ds_trainer.errors import ConfigError, DataError
from ds_trainer.eval_datasets import DatasetSpec, datasets_block, format_datasets, parse_datasets, pooled
from ds_trainer.metrics import PROTOCOL_METRICS, per_generator_metrics


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory) -> Path:
    """A binary-folders set: `wild` (categories merged) and `demo_nearest` (a name the demo set has too)."""
    root = tmp_path_factory.mktemp("other")
    src = binary_tree(root / "wild_src", {"wild/a": (3, 2), "wild/b": (2, 3), "demo_nearest": (4, 4)})
    shard_genimage(src, root / "wild", layout="binary-folders", max_count=5, workers=1, progress=False)
    return root / "wild"


def test_parse_names_paths_and_splits(tiny_shards, other_shards, tmp_path):
    specs = parse_datasets([str(tiny_shards), f"w={other_shards}:val"], "val")
    assert specs == [DatasetSpec("demo", tiny_shards.resolve(), "val"), DatasetSpec("w", other_shards.resolve(), "val")]
    assert parse_datasets([f"tr={tiny_shards}:train"], "val")[0].split == "train"
    # a directory whose name has a ':' is a path as a whole
    odd = tmp_path / "set:v2"
    odd.symlink_to(other_shards, target_is_directory=True)
    assert parse_datasets([str(odd)], "val")[0].name == "wild"  # resolved: the link's target's name
    with pytest.raises(ConfigError, match=r"two shard sets are named demo"):
        parse_datasets([str(tiny_shards), f"demo={other_shards}"], "val")
    with pytest.raises(
        DataError, match=r"has no 'test' split \(it has: train, val\); name the split as demo=PATH:SPLIT"
    ):
        parse_datasets([str(tiny_shards)], "test")
    with pytest.raises(ConfigError, match=r"no split to score"):
        parse_datasets([str(tiny_shards)], None)
    with pytest.raises(DataError, match=r"does not exist"):
        parse_datasets([f"x={tmp_path / 'none'}"], "val")


def _row(seed: int, gens: tuple[str, ...]) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], 20 * len(gens))
    s = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, len(y)), 0, 1)
    g = [gens[i % len(gens)] for i in range(len(y))]
    row = {"val_samples": len(y), "val_bad_samples": 0, "val_loss": 0.5, "val_acc": 0.7,
           "val_generators": per_generator_metrics(s, y, g)}  # fmt: skip
    return row, {"score": s, "label": y, "generator": g, "key": [f"k{i}" for i in range(len(y))]}


@pytest.mark.unit
def test_the_mean_over_sets_is_the_mean_of_the_set_means_and_pooling_prefixes_names():
    rows = {"a": _row(0, ("x", "y", "z")), "b": _row(1, ("x",))}
    block = datasets_block({n: (DatasetSpec(n, Path(f"/s/{n}"), "val"), r) for n, (r, _) in rows.items()})
    assert list(block["sets"]) == ["a", "b"] and block["sets"]["b"]["shards"] == "/s/b"
    for k in PROTOCOL_METRICS:
        want = (rows["a"][0]["val_generators"]["mean"][k] + rows["b"][0]["val_generators"]["mean"][k]) / 2
        assert math.isclose(block["mean"][k], want)
    # not the pooled mean over generators: a has three of the four
    pooled_mean = np.mean(
        [rows["a"][0]["val_generators"][g]["acc"] for g in "xyz"] + [rows["b"][0]["val_generators"]["x"]["acc"]]
    )
    assert not math.isclose(block["mean"]["acc"], pooled_mean)
    assert block["sets"]["a"]["overall"] == {"loss": 0.5, "acc": 0.7}
    pred, table, overall = pooled({n: p for n, (_, p) in rows.items()}, {"a": 0.5, "b": 1.0})
    assert (
        set(table) == {"a/x", "a/y", "a/z", "b/x", "mean"} and pred["key"][0] == "a/k0" and pred["key"][-1] == "b/k39"
    )
    assert math.isclose(overall["loss"], (0.5 * 120 + 1.0 * 40) / 160)
    text = format_datasets(block)
    assert "a / x" in text and "b / mean" in text and re.search(r"mean over sets +" + r" +".join(
        f"{100 * block['mean'][k]:.1f}" for k in PROTOCOL_METRICS), text)  # fmt: skip


def test_eval_cli_over_two_shard_sets(tmp_path, tiny_shards, other_shards, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0},
                       logging={"tensorboard": False}, data={"eval_generators": ["demo_nearest"]})  # fmt: skip
    assert cli.main(["train", "--config", str(cfg)]) == 0
    out = tmp_path / "eval.json"
    base = ["eval", "--load-dir", str(tmp_path / "ckpt"), "--set", "data.num_workers=0"]
    capsys.readouterr()
    argv = [*base, "--out", str(out), "--shards", f"genimage={tiny_shards}", "--shards", str(other_shards),
            "--report", str(tmp_path / "rep")]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    result = json.loads(out.read_text())
    sets = result["datasets"]["sets"]
    assert list(sets) == ["genimage", "wild"]
    # every generator of each set (data.eval_generators does not apply), its own mean
    assert sets["genimage"]["samples"] == 48 and set(sets["genimage"]["generators"]) == {
        "demo_bicubic",
        "demo_nearest",
        "mean",
    }
    # the checkpoint trained on the demo generators: `wild` is unseen, so that set has the unseen mean too
    assert sets["wild"]["samples"] == 18 and set(sets["wild"]["generators"]) == {
        "demo_nearest",
        "wild",
        "mean",
        "mean_unseen",
    }
    assert sets["wild"]["generators"]["mean_unseen"] == sets["wild"]["generators"]["wild"]
    assert sets["wild"]["split"] == "val" and sets["wild"]["shards"] == str(other_shards.resolve())
    # the cells are those of the pooled predictions, by set; the mean over sets from the set means
    pred = result["predictions"]
    names = np.asarray([pred["generators"][i] for i in pred["generator"]])
    scores, labels = np.asarray(pred["score"]), np.asarray(pred["label"])
    assert len(scores) == 66 and set(names) == {
        "genimage/demo_bicubic",
        "genimage/demo_nearest",
        "wild/demo_nearest",
        "wild/wild",
    }
    wild = per_generator_metrics(scores[np.char.startswith(names.astype(str), "wild/")], labels[np.char.startswith(names.astype(str), "wild/")],
                                 [n.split("/", 1)[1] for n in names if n.startswith("wild/")])  # fmt: skip
    for g, row in wild.items():
        for k in PROTOCOL_METRICS:
            assert math.isclose(sets["wild"]["generators"][g][k], row[k], abs_tol=1e-5), (g, k)
    for k in PROTOCOL_METRICS:
        want = (sets["genimage"]["generators"]["mean"][k] + sets["wild"]["generators"]["mean"][k]) / 2
        assert math.isclose(result["datasets"]["mean"][k], want)
    assert result["samples"] == 66 and result["shards"] is None and set(result["generators"]) == {*names, "mean"}
    assert "cross-dataset: 2 shard set(s)" in text and "wild / demo_nearest" in text and "mean over sets" in text
    # the report: the cross-dataset table, and thumbnails found in each set's own shards
    page = (tmp_path / "rep" / "report.html").read_text()
    table = re.search(r"<table class='cross-dataset' id='cross-dataset-0'>(.*?)</table>", page).group(1)
    assert len(re.findall(r"<tr", table)) == 1 + 3 + 4 + 1  # header, genimage (+mean), wild (+mean, unseen), over sets
    mean_row = re.search(r"<tr class='mean' id='cross-dataset-0-mean'>(.*?)</tr>", table).group(1)
    assert re.findall(r"<td>([^<]*)</td>", mean_row)[:5] == [
        f"{100 * result['datasets']['mean'][k]:.1f}" for k in PROTOCOL_METRICS
    ]
    assert "data:image/jpeg;base64," in page and "cannot be read" not in page and "are in no" not in page
    if chromium() is not None:
        dom = run_chromium(["--dump-dom", (tmp_path / "rep" / "report.html").as_uri()], tmp_path / "profile")
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert '<table class="cross-dataset" id="cross-dataset-0">' in dom.stdout
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom.stdout).group(1)))
        assert attrs["data-images"] == attrs["data-images-loaded"] and int(attrs["data-images"]) > 5, attrs

    # one --shards: the single-set JSON as before (its keys), plus the datasets block
    one = tmp_path / "one.json"
    assert cli.main([*base, "--out", str(one), "--shards", f"{other_shards}:val", "--size-matched"]) == 0
    single = json.loads(one.read_text())
    assert single["shards"] == str(other_shards.resolve()) and single["samples"] == 18
    assert set(single["generators"]) == {"demo_nearest", "wild", "mean", "mean_unseen"}
    assert "size-matched" in single["debiased"]
    assert list(single["datasets"]["sets"]) == ["wild"]
    assert single["datasets"]["mean"] == single["generators"]["mean"]
