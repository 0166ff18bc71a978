"""`ds-trainer prepare`: a derived shard set whose tensors equal the load-time path's, with the source's layout."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_config
from PIL import Image

from ds_trainer import cli
from ds_trainer.data import load_manifest, make_shard_loader
from ds_trainer.data.perturb import Perturbation
from ds_trainer.data.prepare import Preparation, prepare_shards
from ds_trainer.data.prepared import check_tracks, for_run
from ds_trainer.data.raw_pixels import raw_bytes, raw_image
from ds_trainer.data.shards import shard_genimage
from ds_trainer.data.transforms import Preprocess
from ds_trainer.errors import ConfigError, DataError
from ds_trainer.eval_tracks import EvalTracks


def _prepare(src: Path, out: Path, prep: Preparation, workers: int = 1):
    return prepare_shards(src, out, prep, workers=workers, progress=False)


@pytest.fixture(scope="module")
def varied_shards(tmp_path_factory, make_tree) -> Path:
    """Images of two shapes whose shortest sides (45, 41) are not 32: a pre-resize to 32 changes them."""
    root = tmp_path_factory.mktemp("varied")
    make_tree(root / "src", {"g_wide": {"train": (6, 6), "val": (3, 3)}}, size=(60, 45))
    make_tree(root / "src", {"g_tall": {"train": (6, 6), "val": (3, 3)}}, size=(41, 70))
    shard_genimage(root / "src", root / "shards", max_count=5, workers=1, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_shards, varied_shards) -> dict[str, Path]:
    """One prepared set per preparation the tests compare with the load-time path."""
    root = tmp_path_factory.mktemp("prepared")
    sets = {
        "align-jpeg": (tiny_shards, Preparation(96)),
        "align-raw": (tiny_shards, Preparation(96, store="raw")),
        "align-resize-raw": (varied_shards, Preparation(96, 32, "raw")),
        "resize-raw": (varied_shards, Preparation(None, 32, "raw")),
        "align-resize-jpeg": (varied_shards, Preparation(96, 32, "jpeg")),
        "resize40-raw": (varied_shards, Preparation(None, 40, "raw")),  # read at 32 with data.resize_shortest 40
    }
    for name, (src, prep) in sets.items():
        _prepare(src, root / name, prep)
    return {name: root / name for name in sets}


def _batches(shards: Path, split: str, pre, train: bool, image_size: int | None = None) -> list[dict]:
    size = image_size or pre.image_size
    loader = make_shard_loader(shards, split, batch_size=4, train=train, num_workers=0, image_size=size,
                               preprocess=pre, seed=3, shuffle_buffer=8)  # fmt: skip
    loader.set_epoch(1)
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert [x["labels"].tolist() for x in a] == [x["labels"].tolist() for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["pixel_values"], y["pixel_values"]), x["key"]


EXACT = [  # (prepared set, data.align_jpeg_quality, image_size, data.resize_shortest): the source set at load time
    ("align-jpeg", 96, 224, None),
    ("align-raw", 96, 224, None),
    ("align-resize-raw", 96, 32, None),
    ("resize-raw", None, 32, None),
    ("resize40-raw", None, 32, 40),
]


@pytest.mark.unit
@pytest.mark.parametrize("name,quality,size,side", EXACT, ids=[e[0] for e in EXACT])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_prepared_tensors_equal_the_load_time_path(prepared, tiny_shards, varied_shards, name, quality, size, side,
                                                    train):  # fmt: skip
    source = tiny_shards if size == 224 else varied_shards
    pre = Preprocess(image_size=size, align_jpeg_quality=quality, draft=False, resize_shortest=side)
    split = "train" if train else "val"
    want, got = _batches(source, split, pre, train), _batches(prepared[name], split, pre, train)
    assert want and sum(len(b["key"]) for b in want) >= 8
    labels = torch.cat([b["labels"] for b in want])
    assert set(labels.tolist()) == {0, 1}  # both classes are compared
    _same(want, got)


@pytest.mark.unit
def test_alignment_was_applied_to_the_fakes_only(prepared, tiny_shards):
    """The prepared fakes are not the source's pixels (they were re-encoded); the reals are."""
    plain = Preprocess(image_size=224, draft=False)
    # read as stored: a Preprocess without the alignment is refused on this set, a plain callable is not checked
    as_stored = lambda img, label, train, rng: plain(img, label, train, rng)  # noqa: E731
    source = _batches(tiny_shards, "val", plain, False)
    aligned = _batches(prepared["align-jpeg"], "val", as_stored, False, image_size=224)
    for a, b in zip(source, aligned):
        for i, label in enumerate(a["labels"].tolist()):
            same = torch.equal(a["pixel_values"][i], b["pixel_values"][i])
            assert same == (label == 0), a["key"][i]


@pytest.mark.unit
def test_eval_perturbation_on_an_aligned_set_equals_the_source(prepared, tiny_shards):
    pre = Preprocess(image_size=224, align_jpeg_quality=96, draft=False, perturb=Perturbation("jpeg", 75))
    _same(_batches(tiny_shards, "val", pre, False), _batches(prepared["align-jpeg"], "val", pre, False))


@pytest.mark.unit
def test_resized_jpeg_store_is_close_but_reencoded(prepared, varied_shards):
    """--store jpeg after a resize adds one JPEG encoding (both classes): same samples, near pixels."""
    pre = Preprocess(image_size=32, align_jpeg_quality=96, draft=False)
    want, got = _batches(varied_shards, "val", pre, False), _batches(prepared["align-resize-jpeg"], "val", pre, False)
    assert [x["key"] for x in want] == [x["key"] for x in got]
    diff = torch.cat([(x["pixel_values"] - y["pixel_values"]).abs().flatten() for x, y in zip(want, got)])
    assert 0 < diff.mean() < 0.2  # normalised units: one 8-bit level is ~0.015


@pytest.mark.unit
def test_raw_store_round_trips_exactly(prepared, tiny_shards):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    with raw_image(raw_bytes(Image.fromarray(pixels))) as img:
        assert img.mode == "RGB" and img.size == (53, 37)
        assert np.array_equal(np.asarray(img), pixels)
    # a raw prepared sample holds exactly the RGB pixels of its source image, after the JPEG alignment
    import tarfile

    src_tar = sorted(tiny_shards.glob("*/val/shard-*.tar"))[0]
    raw_tar = prepared["align-raw"] / src_tar.relative_to(tiny_shards)
    with tarfile.open(src_tar) as a, tarfile.open(raw_tar) as b:
        src = {m.name: a.extractfile(m).read() for m in a if m.isfile()}
        raw = {m.name: b.extractfile(m).read() for m in b if m.isfile()}
    reals = [n for n in src if n.endswith(".jpg")]
    assert reals
    for name in reals:  # reals are not aligned: their decoded pixels, unchanged
        with Image.open(io.BytesIO(src[name])) as img, raw_image(raw[name[: -len(".jpg")] + ".npy"]) as back:
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(back))
    assert not any(n.endswith((".png", ".jpg")) for n in raw)  # every image is raw


@pytest.mark.unit
@pytest.mark.parametrize(
    "make,why",
    [
        (lambda: np.zeros((10, 10, 4), np.uint8), "not \\[H, W, 3\\] uint8"),
        (lambda: np.zeros((10, 10, 3), np.float32), "not \\[H, W, 3\\] uint8"),
        (lambda: np.zeros((4, 40, 3), np.uint8), "MIN_IMAGE_SIDE"),
        (lambda: np.asfortranarray(np.zeros((10, 12, 3), np.uint8)), "C order"),
    ],
)
def test_raw_samples_with_bad_headers_are_refused(make, why):
    buf = io.BytesIO()
    np.save(buf, make(), allow_pickle=False)
    with pytest.raises(ValueError, match=why):
        raw_image(buf.getvalue())
    good = raw_bytes(Image.new("RGB", (16, 16)))
    with pytest.raises(ValueError, match="bytes of pixels"):
        raw_image(good[:-5])  # truncated


@pytest.mark.unit
def test_manifest_counts_and_keys_equal_the_source(prepared, tiny_shards):
    src, out = load_manifest(tiny_shards), load_manifest(prepared["align-jpeg"])  # load_manifest checks sidecars
    fields = ("path", "generator", "split", "count", "ai", "nature")
    assert [{k: e[k] for k in fields} for e in out.raw["shards"]] == [
        {k: e[k] for k in fields} for e in src.raw["shards"]
    ]
    for block in ("counts", "modes", "skipped", "seed", "max_count", "labels"):
        assert out.raw[block] == src.raw[block]
    for entry in src.raw["shards"]:
        side = entry["path"][: -len(".tar")] + ".json"
        keys = json.loads((tiny_shards / side).read_text())["keys"]
        assert json.loads((prepared["align-jpeg"] / side).read_text())["keys"] == keys
    block = out.raw["prepared"]
    digest = __import__("hashlib").sha256((tiny_shards / "manifest.json").read_bytes()).hexdigest()
    assert block["align_jpeg_quality"] == 96 and block["align_classes"] == "fakes"
    assert block["resize_shortest"] is None and block["store"] == "jpeg"
    assert block["source"] == {"name": tiny_shards.name, "manifest_sha256": digest}
    # equal epoch lengths for every rank, from the same counts
    pre = Preprocess(image_size=224, align_jpeg_quality=96, draft=False)
    for world in (1, 3):
        sizes = [
            len(make_shard_loader(d, "train", batch_size=4, train=True, world_size=world, rank=r, preprocess=pre))
            for d in (tiny_shards, prepared["align-jpeg"]) for r in range(world)
        ]  # fmt: skip
        assert len(set(sizes)) == 1


@pytest.mark.unit
def test_a_sample_the_loader_counts_as_bad_stays_bad(tmp_path, make_tree):
    make_tree(tmp_path / "src", {"g": {"val": (4, 4)}}, size=(40, 32))
    broken = tmp_path / "src" / "g" / "val" / "ai" / "ai_001.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: sharded unverified, counted, bad at load time
    shard_genimage(tmp_path / "src", tmp_path / "shards", max_count=10, workers=1, progress=False, verify=False)
    _prepare(tmp_path / "shards", tmp_path / "out", Preparation(90, store="raw"))
    pre = Preprocess(image_size=32, align_jpeg_quality=90, draft=False)
    want, got = _batches(tmp_path / "shards", "val", pre, False), _batches(tmp_path / "out", "val", pre, False)
    assert sum(b["bad_samples"] for b in want) == sum(b["bad_samples"] for b in got) == 1
    _same(want, got)


@pytest.mark.unit
def test_a_short_source_shard_is_refused(tmp_path, tiny_shards):
    src = tmp_path / "src"
    shutil.copytree(tiny_shards, src)
    tar = sorted(src.glob("*/train/shard-*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match=f"source shard {tar}.*re-create the source shards"):
        _prepare(src, tmp_path / "out", Preparation(96))


CONTRADICTIONS = [  # (preparation, Preprocess changes, train, message)
    (Preparation(96), {}, False, r"data\.align_jpeg_quality is unset, but .*quality 96"),
    (Preparation(96), {"align_jpeg_quality": 90}, False, r"is 90, but .* set data\.align_jpeg_quality: 96"),
    (Preparation(None, 224, "raw"), {"image_size": 256}, False, r"data\.image_size 256, but .*resized to 224"),
    (Preparation(None, 224, "raw"), {"crop": "native"}, False, r"data\.crop is native"),
    (
        Preparation(None, 256, "raw"),
        {"resize_shortest": 240},
        False,
        r"data\.resize_shortest 240, but .*resized to 256",
    ),
    (Preparation(None, 224, "raw"), {"align_jpeg_quality": 96}, False, r"re-encoded after the resize"),
    (Preparation(None, 224, "raw"), {"blur_prob": 0.5}, True, r"data\.blur_prob 0\.5"),
    (Preparation(None, 224, "raw"), {"perturb": Perturbation("blur", 1.0)}, False, r"perturbation acts on the full"),
]


class _Manifest:
    def __init__(self, prep: Preparation) -> None:
        self.root = Path("/sets/prepared")
        self.raw = {"prepared": prep.block("genimage", "0" * 64)}


@pytest.mark.unit
@pytest.mark.parametrize("prep,change,train,message", CONTRADICTIONS)
def test_a_contradicting_data_section_is_refused_naming_both(prep, change, train, message):
    with pytest.raises(ConfigError, match=message) as exc:
        for_run(_Manifest(prep), Preprocess(**{"image_size": 224, **change}), train=train)
    assert "/sets/prepared was prepared" in str(exc.value) and "source set (genimage)" in str(exc.value)


@pytest.mark.unit
def test_agreeing_settings_are_accepted_minus_what_the_set_holds():
    pre = Preprocess(image_size=224, align_jpeg_quality=96, blur_prob=0.5)
    assert for_run(_Manifest(Preparation(96)), pre, train=True).align_jpeg_quality is None
    resized = for_run(_Manifest(Preparation(96, 224, "raw")), Preprocess(224, align_jpeg_quality=96), train=True)
    assert resized == Preprocess(224)
    wider = Preprocess(224, resize_shortest=256)  # UnivFD's 256 then 224, on a set pre-resized to 256
    assert for_run(_Manifest(Preparation(None, 256, "raw")), wider, train=True) == wider
    # augmentation on a resized set only matters to training: its eval loader is accepted
    assert for_run(_Manifest(Preparation(None, 224)), Preprocess(224, blur_prob=0.5), train=False).blur_prob == 0.5
    # a raw, unresized, unaligned set: load-time alignment of its pixels is the source's
    assert for_run(_Manifest(Preparation(store="raw")), pre, train=True) is pre


@pytest.mark.unit
def test_eval_tracks_a_prepared_set_cannot_give_are_refused():
    aligned, resized = _Manifest(Preparation(96)), _Manifest(Preparation(None, 224, "raw"))
    with pytest.raises(ConfigError, match="compressed twice"):
        check_tracks(aligned, EvalTracks(align_jpeg=90))
    check_tracks(aligned, EvalTracks(perturbations=(Perturbation("jpeg", 75),), size_matched=True))  # exact there
    with pytest.raises(ConfigError, match="--perturb, --size-matched: .*full-size"):
        check_tracks(resized, EvalTracks(perturbations=(Perturbation("jpeg", 75),), size_matched=True))
    check_tracks(_Manifest(Preparation(store="raw")), EvalTracks(align_jpeg=90, size_matched=True))


@pytest.mark.unit
def test_preparation_flags_are_checked():
    for kwargs, message in [
        ({}, "nothing to do"),
        ({"align_jpeg_quality": 0}, "--align-jpeg 0"),
        ({"resize_shortest": 8}, "--resize-shortest 8"),
        ({"align_jpeg_quality": 96, "jpeg_quality": 80}, "--jpeg-quality is the quality of a resized"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Preparation(**kwargs)
    assert Preparation(90, 224).jpeg_quality == 90 and Preparation(None, 224).jpeg_quality == 96


@pytest.mark.unit
def test_prepare_resumes_and_redoes_a_changed_preparation(tmp_path, tiny_shards):
    first = _prepare(tiny_shards, tmp_path / "out", Preparation(96))
    n = len(first.manifest["shards"])
    assert (first.written, first.reused) == (n, 0)
    stale = tmp_path / "out" / "demo_nearest" / "train" / "shard-000009.tmp"
    stale.write_bytes(b"half")  # a worker killed mid-shard
    again = _prepare(tiny_shards, tmp_path / "out", Preparation(96))
    assert (again.written, again.reused) == (0, n) and not stale.exists()
    other = _prepare(tiny_shards, tmp_path / "out", Preparation(80))
    assert (other.written, other.reused) == (n, 0) and other.manifest["prepared"]["align_jpeg_quality"] == 80


def test_cli_prepares_in_parallel_and_trains_on_the_set(tmp_path, tiny_shards, capsys):
    out = tmp_path / "aligned"
    argv = ["prepare", str(tiny_shards), str(out), "--align-jpeg", "96", "--workers", "2", "--no-progress"]
    assert cli.main(argv) == 0
    line = capsys.readouterr().out
    assert f"prepared 12 shards in {out} (fakes re-encoded as JPEG at quality 96, stored as JPEG)" in line
    assert cli.main(argv) == 0 and "12 kept from an earlier run" in capsys.readouterr().out
    cfg = write_config(tmp_path / "cfg.yaml", out, data={"align_jpeg_quality": 96},
                       training={"num_epochs": 1, "warmup_epochs": 0})  # fmt: skip
    assert cli.main(["train", "--config", str(cfg)]) == 0
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_samples" in r]
    assert evals and evals[-1]["val_samples"] == 48 and evals[-1]["val_bad_samples"] == 0
