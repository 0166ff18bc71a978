"""`ds-trainer eval`'s robustness sweeps (`--perturb`) and debiased track (`--align-jpeg`, `--size-matched`).

Pixels are checked against a direct PIL computation; the loader tests read real shards (worker
processes); the CLI test trains the tiny CLIP for one epoch in this process and evaluates it.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_config
from PIL import Image, ImageFilter

from ds_trainer.data import make_shard_loader, shard_genimage
from ds_trainer.data.perturb import PRESETS, Perturbation, parse_perturbations
from ds_trainer.data.transforms import Preprocess
from ds_trainer.errors import ConfigError
from ds_trainer.eval_tracks import (
    SIZE_MATCHED,
    EvalTracks,
    format_tracks,
    run_tracks,
    size_matched_block,
    size_matched_mask,
    tracks_from_args,
)
from ds_trainer.metrics import ALL_METRICS, PROTOCOL_METRICS, per_generator_metrics


def photo(w: int = 200, h: int = 150, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: JPEG, blur and resize all change it visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def direct(img: Image.Image, kind: str, level: float) -> Image.Image:
    """What each perturbation must equal, written with PIL alone."""
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(level))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=level))
    w, h = img.size
    if kind == "resize":  # shortest side (h here) to `level`, aspect kept
        return img.resize((round(w * level / h), int(level)), Image.Resampling.BICUBIC)
    return img.resize((round(w * level), round(h * level)), Image.Resampling.BICUBIC)


CASES = [("jpeg", 95), ("jpeg", 50), ("jpeg", 30), ("blur", 1), ("blur", 2.5), ("resize", 112), ("resize", 64),
         ("downscale", 0.5), ("downscale", 0.25)]  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize("kind, level", CASES, ids=[f"{k}:{v}" for k, v in CASES])
def test_each_perturbation_equals_the_direct_pil_computation(kind, level):
    img = photo()
    got = Perturbation(kind, float(level))(img)
    want = direct(img, kind, level)
    assert got.size == want.size
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got.resize(img.size)), np.asarray(img))  # it did change the image
    # In the preprocessing: applied to the decoded RGB image, before the resize, crop and normalisation.
    p = Preprocess(image_size=48, draft=False)
    out = dataclass_replace(p, perturb=Perturbation(kind, float(level)))(img, 0)
    assert torch.equal(out, p(want, 0))


def dataclass_replace(p: Preprocess, **changes) -> Preprocess:
    import dataclasses

    return dataclasses.replace(p, **changes)


@pytest.mark.unit
def test_resize_never_upscales_and_blur_zero_is_the_identity():
    img = photo(100, 60)
    assert Perturbation("resize", 64.0)(img) is img  # 60 px already below 64
    assert Perturbation("resize", 32.0)(img).size == (53, 32)
    assert Perturbation("blur", 0.0)(img) is img
    assert Perturbation("downscale", 1.0)(img) is img
    assert Perturbation("downscale", 0.001)(img).size == (1, 1)


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("spec", ["jpeg:40", "blur:2", "resize:32", "downscale:0.25"])
def test_the_same_file_labelled_real_and_fake_gives_the_same_tensor(fmt, spec):
    buf = io.BytesIO()
    photo(180, 140, seed=3).save(buf, format=fmt, quality=95)
    (perturb,) = parse_perturbations([spec])
    p = Preprocess(image_size=64, draft=False, perturb=perturb)
    real, fake = (p(Image.open(io.BytesIO(buf.getvalue())), label) for label in (0, 1))
    assert torch.equal(real, fake)
    clean = Preprocess(image_size=64, draft=False)(Image.open(io.BytesIO(buf.getvalue())), 0)
    assert not torch.equal(real, clean)


@pytest.mark.unit
def test_align_jpeg_both_treats_the_classes_alike_and_fakes_only_the_fakes():
    img = photo(120, 100, seed=5)
    both = Preprocess(image_size=64, draft=False, align_jpeg_quality=60, align_classes="both")
    fakes = Preprocess(image_size=64, draft=False, align_jpeg_quality=60)
    plain = Preprocess(image_size=64, draft=False)
    assert torch.equal(both(img, 0), both(img, 1))
    assert torch.equal(both(img, 0), plain(direct(img, "jpeg", 60), 0))
    assert torch.equal(fakes(img, 1), both(img, 1)) and torch.equal(fakes(img, 0), plain(img, 0))
    with pytest.raises(ValueError, match="align_classes"):
        Preprocess(align_classes="reals")


@pytest.mark.unit
def test_parser_presets_levels_and_order():
    got = parse_perturbations(["jpeg:95,75", "blur:1,3.5", "resize:112", "downscale:0.5,0.25", "jpeg:75"])
    assert [p.name for p in got] == ["jpeg:95", "jpeg:75", "blur:1", "blur:3.5", "resize:112",
                                     "downscale:0.5", "downscale:0.25"]  # fmt: skip
    assert got[0] == Perturbation("jpeg", 95.0) and got[3].level == 3.5
    preset = parse_perturbations(["genimage-degraded"])
    assert [p.name for p in preset] == ["resize:112", "resize:64", "jpeg:65", "jpeg:30", "blur:3", "blur:5"]
    assert set(PRESETS) == {"genimage-degraded"}
    assert parse_perturbations([" JPEG : 50 , 30 "]) == [Perturbation("jpeg", 50.0), Perturbation("jpeg", 30.0)]
    assert parse_perturbations([]) == []
    assert Perturbation("blur", 3.0).describe() == "Gaussian blur, sigma 3 px"


@pytest.mark.unit
@pytest.mark.parametrize(
    "spec, message",
    [
        ("sharpen:1", "unknown kind 'sharpen'"), ("genimage", "unknown kind 'genimage'"),
        ("jpeg:0", "whole number from 1 to 100"), ("jpeg:101", "whole number from 1 to 100"),
        ("jpeg:75.5", "whole number from 1 to 100"), ("blur:-1", ">= 0"), ("blur:nan", ">= 0"),
        ("blur:abc", ">= 0"), ("resize:4", ">= 8"), ("resize:7.5", ">= 8"), ("downscale:0", r"\(0, 1\]"),
        ("downscale:1.5", r"\(0, 1\]"), ("jpeg", "at least one level"), ("jpeg:", "at least one level"),
        ("blur:1,", "at least one level"), ("", "unknown kind ''"),
    ],
)  # fmt: skip
def test_bad_perturbations_are_refused_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_perturbations(["jpeg:50", spec])
    assert len(str(err.value).splitlines()) == 1 and repr(spec) in str(err.value)


@pytest.mark.unit
def test_track_flags_are_checked():
    t = tracks_from_args(["blur:1"], "96", None, True)
    assert t == EvalTracks((Perturbation("blur", 1.0),), 96, "both", True)
    assert t.align_name == "align-jpeg:96:both" and "both classes" in t.align_label()
    fakes = tracks_from_args([], "90", "fakes")
    assert fakes.align_name == "align-jpeg:90:fakes" and "AI-generated images only" in fakes.align_label()
    assert tracks_from_args() == EvalTracks()
    for q in ("0", "101", "q96", "96.5"):
        with pytest.raises(ConfigError, match="--align-jpeg"):
            tracks_from_args([], q)
    with pytest.raises(ConfigError, match="give --align-jpeg Q too"):
        tracks_from_args([], None, "fakes")


@pytest.mark.unit
def test_size_matched_keeps_the_reals_within_their_generators_fake_range():
    # generator a: fakes 256x256 and 256x300; b: fakes 512x512 only; c: reals only
    rows = [
        ("a", 1, (256, 256)), ("a", 1, (256, 300)),
        ("a", 0, (256, 256)), ("a", 0, (256, 280)), ("a", 0, (256, 300)),  # inside: kept
        ("a", 0, (255, 256)), ("a", 0, (300, 256)), ("a", 0, (256, 301)), ("a", 0, (512, 512)),  # outside
        ("b", 1, (512, 512)), ("b", 0, (512, 512)), ("b", 0, (256, 256)), ("b", 0, (512, 384)),
        ("c", 0, (256, 256)),
    ]  # fmt: skip
    gens, labels, sizes = (list(col) for col in zip(*rows))
    keep, ranges = size_matched_mask(sizes, labels, gens)
    assert keep.tolist() == [True, True, True, True, True, False, False, False, False, True, True, False, False, False]
    assert ranges == {
        "a": {"width": [256, 256], "height": [256, 300]},
        "b": {"width": [512, 512], "height": [512, 512]},
    }

    scores = np.linspace(0.05, 0.95, len(rows))
    block = size_matched_block({"score": scores, "label": np.array(labels), "generator": gens, "size": sizes})
    assert block["reals_kept"] == {"a": 3, "b": 1, "c": 0} and block["reals_total"] == {"a": 7, "b": 3, "c": 1}
    assert block["samples"] == int(keep.sum()) == 7 and block["fake_size_range"] == ranges
    want = per_generator_metrics(scores[keep], np.array(labels)[keep], np.array(gens)[keep].tolist())
    assert block["generators"] == want and set(want) == {"a", "b", "mean"}
    assert "min..max" in block["rule"]
    with pytest.raises(ConfigError, match="size"):
        size_matched_block({"score": scores, "label": labels, "generator": gens, "size": None})


@pytest.mark.unit
def test_run_tracks_makes_one_pass_per_level_with_drafting_off():
    seen: list[Preprocess] = []

    def make_loader(p: Preprocess):
        seen.append(p)
        return len(seen)  # stands for the loader

    def evaluate(loader):
        acc = 0.1 * loader
        table = {"g": dict.fromkeys(PROTOCOL_METRICS, acc), "mean": dict.fromkeys(PROTOCOL_METRICS, acc)}
        return {"val_samples": 10, "val_bad_samples": 0, "val_acc": acc, "val_real_acc": acc, "val_fake_acc": acc,
                "val_ap": acc, "val_auc": acc, "val_loss": 1.0, "val_generators": table}  # fmt: skip

    tracks = tracks_from_args(["jpeg:75", "resize:64"], "96", "fakes", True)
    clean = {"score": [0.2, 0.8], "label": [0, 1], "generator": ["g", "g"], "size": [(8, 8), (8, 8)]}
    base = Preprocess(image_size=32, draft=True, align_jpeg_quality=90)
    out = run_tracks(evaluate, make_loader, base, tracks, clean)
    assert [p.perturb for p in seen] == [Perturbation("jpeg", 75.0), Perturbation("resize", 64.0), None]
    assert all(p.draft is False and p.image_size == 32 for p in seen)
    assert seen[0].align_jpeg_quality == 90  # the configured data, then degraded
    assert (seen[2].align_jpeg_quality, seen[2].align_classes) == (96, "fakes")
    assert list(out["robustness"]) == ["jpeg:75", "resize:64"]
    r = out["robustness"]["resize:64"]
    assert r["kind"] == "resize" and r["level"] == 64 and r["samples"] == 10
    assert r["overall"]["acc"] == pytest.approx(0.2) and r["generators"]["g"]["auc"] == pytest.approx(0.2)
    assert list(out["debiased"]) == ["align-jpeg:96:fakes", SIZE_MATCHED]
    assert out["debiased"]["align-jpeg:96:fakes"]["overall"]["auc"] == pytest.approx(0.3)
    assert out["debiased"][SIZE_MATCHED]["reals_kept"] == {"g": 1}
    text = format_tracks(out)
    assert "robustness jpeg:75: JPEG re-encoded at quality 75, both classes (10 samples)" in text
    assert "debiased align-jpeg:96:fakes: the AI-generated images only re-encoded" in text
    assert "debiased size-matched" in text and "reals kept: g 1/1" in text
    assert run_tracks(evaluate, make_loader, base, EvalTracks(), clean) == {}


@pytest.fixture(scope="module")
def twin_shards(tmp_path_factory) -> Path:
    """Every image twice, byte for byte: once as ai, once as nature (PNG and JPEG files, varied sizes)."""
    root = tmp_path_factory.mktemp("twins")
    for i in range(12):
        img = photo(60 + 7 * i, 48 + 3 * i, seed=100 + i)
        ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
        for cls in ("ai", "nature"):
            folder = root / "src" / "gen" / "val" / cls
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:02d}.{ext}", format=fmt, quality=90)
    shard_genimage(root / "src", root / "shards", max_count=5, progress=False, workers=1)
    return root / "shards"


def _by_key(shards: Path, preprocess: Preprocess, workers: int, world_size: int = 1) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for rank in range(world_size):
        loader = make_shard_loader(shards, "val", batch_size=4, train=False, rank=rank, world_size=world_size,
                                   num_workers=workers, preprocess=preprocess)  # fmt: skip
        for batch in loader:
            for key, x, y, wh in zip(batch["key"], batch["pixel_values"], batch["labels"], batch["size"]):
                assert key not in out, f"{key} read twice"
                out[key] = (x, int(y), tuple(wh))
    return out


@pytest.mark.parametrize("spec", ["jpeg:30", "blur:2", "resize:24"])
def test_loader_perturbs_both_classes_alike_and_the_same_on_any_worker_count(twin_shards, spec):
    (perturb,) = parse_perturbations([spec])
    p = Preprocess(image_size=32, draft=False, perturb=perturb)
    one = _by_key(twin_shards, p, workers=0)
    many = _by_key(twin_shards, p, workers=2, world_size=2)
    assert len(one) == 24 and one.keys() == many.keys()  # every sample once, on any split of the work
    for key in one:
        assert torch.equal(one[key][0], many[key][0]), key
    # each real has a fake twin with the identical tensor, and the twins are told apart from the rest
    reals = [x for x, y, _ in one.values() if y == 0]
    fakes = [x for x, y, _ in one.values() if y == 1]
    assert len(reals) == len(fakes) == 12
    for x in reals:
        assert sum(torch.equal(x, f) for f in fakes) == 1
    # the loader did apply it, and recorded each file's own size
    clean = _by_key(twin_shards, Preprocess(image_size=32, draft=False), workers=0)
    assert all(not torch.equal(clean[k][0], one[k][0]) for k in one)
    assert sorted({wh for _, _, wh in one.values()}) == sorted((60 + 7 * i, 48 + 3 * i) for i in range(12))


def test_eval_cli_writes_robustness_and_debiased_tables(tmp_path, tiny_shards, monkeypatch, capsys):
    from ds_trainer import cli

    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0},
                       logging={"tensorboard": False})  # fmt: skip
    assert cli.main(["train", "--config", str(cfg)]) == 0
    out = tmp_path / "eval.json"
    argv = ["eval", "--config", str(cfg), "--load-dir", str(tmp_path / "ckpt"), "--out", str(out),
            "--set", "data.num_workers=0", "--perturb", "jpeg:50", "--perturb", "blur:2,4", "--align-jpeg", "96",
            "--size-matched", "--report", str(tmp_path / "rep")]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    result = json.loads(out.read_text())
    # the clean result as before
    assert result["samples"] == 48 and set(result["generators"]) == {"demo_bicubic", "demo_nearest", "mean"}
    assert len(result["predictions"]["score"]) == 48
    # a full pass per level, each sample once
    assert list(result["robustness"]) == ["jpeg:50", "blur:2", "blur:4"]
    for name, block in result["robustness"].items():
        assert block["samples"] == 48 and block["bad_samples"] == 0, name
        assert set(block["generators"]) == {"demo_bicubic", "demo_nearest", "mean"}
        assert set(block["generators"]["mean"]) == set(ALL_METRICS)
        assert f"robustness {name}: " in text
    assert result["robustness"]["blur:4"]["level"] == 4 and result["robustness"]["blur:4"]["kind"] == "blur"
    # blurring the checkerboard away changes the scores
    assert result["robustness"]["blur:4"]["overall"] != result["overall"]
    aligned = result["debiased"]["align-jpeg:96:both"]
    assert aligned["samples"] == 48 and "both classes" in aligned["label"]
    sm = result["debiased"][SIZE_MATCHED]
    assert sum(sm["reals_total"].values()) == 24 and sm["samples"] == 24 + sum(sm["reals_kept"].values())
    for g, r in sm["fake_size_range"].items():
        assert r["height"] == [224, 224] and r["width"][0] <= r["width"][1], g  # demo crops are 224 px high
    names = [result["predictions"]["generators"][i] for i in result["predictions"]["generator"]]
    labels = np.asarray(result["predictions"]["label"])
    assert sm["reals_kept"]["demo_nearest"] <= int(((np.asarray(names) == "demo_nearest") & (labels == 0)).sum())
    assert "debiased align-jpeg:96:both" in text and "debiased size-matched" in text
    # the report: the robustness plot and the tables
    assert (tmp_path / "rep" / "robustness.png").stat().st_size > 1000
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "id='fig-robustness'" in page and "id='robustness-0-jpeg'" in page and "id='robustness-0-blur'" in page
    assert "id='debiased-0-align-jpeg:96:both'" in page and "id='debiased-0-size-matched'" in page
    cell = result["robustness"]["blur:2"]["generators"]["mean"]["acc"]
    assert math.isfinite(cell) and f"<td>{100 * cell:.1f}</td>" in page
