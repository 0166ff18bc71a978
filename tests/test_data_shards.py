"""GenImage scanning, shard writing and manifest loading."""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ds_trainer.data import load_manifest, scan_tree, shard_genimage, shard_write
from ds_trainer.data.shard_plan import parse_size
from ds_trainer.data.transforms import to_rgb
from ds_trainer.errors import DataError


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


# ---------------------------------------------------------------- scan


def test_scan_layout_labels_and_case_insensitive_extensions(tmp_path: Path, make_tree) -> None:
    root = make_tree(tmp_path / "gi", {"g1": {"train": (2, 3), "val": (1, 1)}, "g2": {"train": (1, 1)}})
    ai = root / "g1" / "train" / "ai"
    Image.new("RGB", (8, 8)).save(ai / "upper.PNG")
    Image.new("RGB", (8, 8)).save(ai / "mixed.JpEg", format="JPEG")
    (ai / "notes.txt").write_text("junk")
    (root / "g1" / "val" / "nature" / "Thumbs.db").write_bytes(b"\0")

    scan = scan_tree(root)
    records = scan.records
    assert len(scan.skipped) == 2
    by = Counter((r.generator, r.split, r.label) for r in records)
    assert by == {
        ("g1", "train", 1): 4,
        ("g1", "train", 0): 3,
        ("g1", "val", 1): 1,
        ("g1", "val", 0): 1,
        ("g2", "train", 1): 1,
        ("g2", "train", 0): 1,
    }
    names = {r.path.name for r in records}
    assert {"upper.PNG", "mixed.JpEg"} <= names and "notes.txt" not in names
    assert records == scan_tree(root).records  # sorted, reproducible


def test_scan_generator_filter(tmp_path: Path, make_tree) -> None:
    root = make_tree(tmp_path / "gi", {"g1": {"train": (1, 1)}, "g2": {"train": (1, 1)}})
    assert {r.generator for r in scan_tree(root, ["g2"]).records} == {"g2"}
    with pytest.raises(DataError, match="nope.*available: g1, g2"):
        scan_tree(root, ["nope"])


def test_scan_missing_or_empty_src(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_tree(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "stray_dir").mkdir()
    with pytest.raises(DataError, match="no generator folders.*stray_dir"):
        scan_tree(tmp_path / "empty")


# ---------------------------------------------------------------- shard_genimage


@pytest.fixture
def shard_set(tmp_path: Path, make_tree) -> tuple[Path, Path, dict]:
    src = make_tree(tmp_path / "gi", {"g.1": {"train": (12, 11), "val": (3, 2)}, "g2": {"train": (4, 4)}})
    (src / "g2" / "train" / "ai" / "readme.md").write_text("junk")
    out = tmp_path / "shards"
    manifest = shard_genimage(src, out, max_count=10, seed=3, progress=False).manifest
    return src, out, manifest


def test_round_trip_bytes_keys_and_metadata(shard_set) -> None:
    src, out, manifest = shard_set
    seen_keys: set[str] = set()
    for entry in manifest["shards"]:
        samples = _tar_samples(out / entry["path"])
        assert len(samples) == entry["count"]
        labels = []
        for key, files in samples.items():
            assert "." not in key and "/" not in key
            assert key not in seen_keys
            seen_keys.add(key)
            meta = json.loads(files["json"])
            original = src / meta["path"]
            image_ext = "png" if original.suffix == ".png" else "jpg"
            assert files[image_ext] == original.read_bytes()  # stored unchanged
            assert set(files) == {image_ext, "cls", "json"}
            assert int(files["cls"]) == meta["label"] == (1 if "/ai/" in meta["path"] else 0)
            assert (meta["generator"], meta["split"]) == (entry["generator"], entry["split"])
            assert (meta["width"], meta["height"]) == Image.open(original).size
            labels.append(meta["label"])
        assert (entry["ai"], entry["nature"]) == (sum(labels), len(labels) - sum(labels))
    assert len(seen_keys) == 12 + 11 + 3 + 2 + 4 + 4


def test_manifest_counts_and_shard_mixing(shard_set) -> None:
    _, out, manifest = shard_set
    assert manifest["counts"] == {
        "g.1": {"train": {"ai": 12, "nature": 11, "total": 23}, "val": {"ai": 3, "nature": 2, "total": 5}},
        "g2": {"train": {"ai": 4, "nature": 4, "total": 8}},
    }
    assert manifest["skipped"]["non_image"] == 1
    assert [e["path"] for e in manifest["shards"]] == [
        "g.1/train/shard-000000.tar",
        "g.1/train/shard-000001.tar",
        "g.1/train/shard-000002.tar",
        "g.1/val/shard-000000.tar",
        "g2/train/shard-000000.tar",
    ]
    assert [e["count"] for e in manifest["shards"]] == [10, 10, 3, 5, 8]
    # write-time shuffle: every multi-sample shard holds both classes
    for entry in manifest["shards"]:
        assert entry["ai"] > 0 and entry["nature"] > 0, entry
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.rglob("*.tmp"))


def test_shards_are_reproducible(tmp_path: Path, shard_set) -> None:
    src, out, manifest = shard_set
    again = shard_genimage(src, tmp_path / "again", max_count=10, seed=3, progress=False).manifest
    for entry in manifest["shards"]:
        assert (out / entry["path"]).read_bytes() == (tmp_path / "again" / entry["path"]).read_bytes()
    assert again["shards"] == manifest["shards"]


def test_rewrite_removes_stale_shards(shard_set) -> None:
    src, out, _ = shard_set
    manifest = shard_genimage(src, out, max_count=100, seed=3, progress=False).manifest
    assert len(manifest["shards"]) == 3
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == sorted(
        e["path"] for e in manifest["shards"]
    )
    # sidecars of the old plan go too: a stale one must never vouch for a shard on resume
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("shard-*.json")) == sorted(
        e["path"].replace(".tar", ".json") for e in manifest["shards"]
    )


def test_unreadable_image_is_skipped_at_write_time(tmp_path: Path, make_tree) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (2, 2)}})
    (src / "g" / "train" / "ai" / "broken.png").write_bytes(b"not a png")
    manifest = shard_genimage(src, tmp_path / "out", progress=False).manifest
    assert manifest["skipped"]["unreadable"] == 1
    assert manifest["counts"]["g"]["train"]["total"] == 4


# ---------------------------------------------------------------- load_manifest / select


def test_load_manifest_and_select(shard_set) -> None:
    _, out, _ = shard_set
    m = load_manifest(out)
    assert m.root == out.resolve()
    assert m.generators == ["g.1", "g2"]
    assert load_manifest(out / "manifest.json").shards == m.shards
    for s in m.shards:
        assert Path(s.url).is_absolute() and Path(s.url).is_file()
    assert [s.count for s in m.select("train")] == [10, 10, 3, 8]
    assert [s.count for s in m.select("train", ["g2"])] == [8]
    assert [s.count for s in m.select("val")] == [5]


def test_select_errors_name_what_exists(shard_set) -> None:
    _, out, _ = shard_set
    m = load_manifest(out)
    with pytest.raises(DataError, match="nope.*g.1, g2"):
        m.select("train", ["nope"])
    with pytest.raises(DataError, match="'val'.*g.1/train, g.1/val, g2/train"):
        m.select("val", ["g2"])
    with pytest.raises(DataError, match="'test'"):
        m.select("test")


def test_load_manifest_missing_things(tmp_path: Path, shard_set) -> None:
    with pytest.raises(DataError, match="does not exist.*ds-trainer shard --src.*ds-trainer demo-data"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json.*ds-trainer shard"):
        load_manifest(tmp_path / "empty")
    _, out, manifest = shard_set
    (out / manifest["shards"][0]["path"]).unlink()
    assert len(load_manifest(out).shards) == len(manifest["shards"])  # the loader counts its samples as bad
    for entry in manifest["shards"][1:]:
        (out / entry["path"]).unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"all \d+ shards listed in .* are missing"):
        load_manifest(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(out)


# ---------------------------------------------------------------- the real release: layout quirks, bad files, resume

ADM = "ADM/imagenet_ai_0508_adm"
SDV = "stable_diffusion_v_1_4/imagenet_ai_0419_sdv4"


def _noise(size: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png_with_corrupt_pixels() -> bytes:
    """Valid chunks and CRCs (PIL's verify() passes) around IDAT data that does not inflate."""
    data = bytearray(_encoded(_noise(16, 9), "PNG"))
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4 : i])[0]
    for k in range(i + 4 + n // 2, i + 12 + n // 2):
        data[k] ^= 0xFF
    data[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(data[i : i + 4 + n])))
    return bytes(data)


def _put(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _release_tree(root: Path) -> Path:
    """A tiny GenImage release with its real quirks (see the module's expectations below)."""
    rgba = _noise(16, 1).convert("RGBA")
    rgba.putalpha(128)
    files = {
        # ADM: nested folder, mixed-case extensions, every accepted colour mode, four broken files
        f"{ADM}/train/ai/115_adm_0.PNG": _encoded(_noise(16, 2), "PNG"),
        f"{ADM}/train/ai/115_adm_1.png": _encoded(rgba, "PNG"),
        f"{ADM}/train/ai/115_adm_2.png": _encoded(_noise(16, 3).convert("P"), "PNG"),
        f"{ADM}/train/ai/115_adm_3.webp": _encoded(_noise(16, 4), "WEBP"),
        f"{ADM}/train/ai/115_adm_4.png": _encoded(_noise(16, 5).convert("LA"), "PNG"),
        f"{ADM}/train/ai/115_adm_truncated.png": _encoded(_noise(32, 6), "PNG")[:1500],
        f"{ADM}/train/ai/115_adm_header.png": b"\x89PNG\r\n\x1a\n" + b"\xff" * 64,
        f"{ADM}/train/ai/115_adm_pixels.png": _png_with_corrupt_pixels(),
        f"{ADM}/train/nature/n01440764_1.JPEG": _encoded(_noise(16, 7), "JPEG"),
        f"{ADM}/train/nature/n01440764_2.JPEG": _encoded(_noise(16, 8).convert("L"), "JPEG"),
        f"{ADM}/train/nature/n01440764_3.jpg": _encoded(_noise(16, 10).convert("CMYK"), "JPEG"),
        f"{ADM}/train/nature/n01440764_4.Jpeg": _encoded(_noise(16, 11), "JPEG"),
        f"{ADM}/train/nature/n01440764_truncated.JPEG": _encoded(_noise(64, 12), "JPEG")[:800],
        f"{ADM}/train/nature/.DS_Store": b"\0\0\0\1Bud1",
        f"{ADM}/train/nature/Thumbs.db": b"\0",
        "ADM/__MACOSX/imagenet_ai_0508_adm/train/ai/._115_adm_0.PNG": b"\0\5\26\7",
        # SDV: plain RGB, one LA, a val split, junk next to the split folders
        **{f"{SDV}/train/ai/033_sdv4_{i:05d}.png": _encoded(_noise(16, 20 + i), "PNG") for i in range(4)},
        **{f"{SDV}/train/nature/n03594734_{i}.JPEG": _encoded(_noise(16, 30 + i), "JPEG") for i in range(3)},
        **{f"{SDV}/val/ai/033_sdv4_val{i}.png": _encoded(_noise(16, 40 + i), "PNG") for i in range(2)},
        **{f"{SDV}/val/nature/ILSVRC2012_val_0000027{i}.JPEG": _encoded(_noise(16, 50 + i), "JPEG") for i in (8, 9)},
        f"{SDV}/notes.txt": b"download notes",
        "stable_diffusion_v_1_4/cover.jpg": _encoded(_noise(16, 60), "JPEG"),
    }
    for rel, data in files.items():
        _put(root, rel, data)
    for cls in ("ai", "nature"):  # ADM's val split: folders, no images
        (root / ADM / "val" / cls).mkdir(parents=True)
    return root


RELEASE_COUNTS = {
    "ADM": {"train": {"ai": 5, "nature": 4, "total": 9}, "val": {"ai": 0, "nature": 0, "total": 0}},
    "stable_diffusion_v_1_4": {"train": {"ai": 4, "nature": 3, "total": 7}, "val": {"ai": 2, "nature": 2, "total": 4}},
}
RELEASE_SKIPPED = [  # (path, kind, reason pattern), sorted by path
    ("ADM/__MACOSX", "non_image", "hidden or system folder"),
    (f"{ADM}/train/ai/115_adm_header.png", "unreadable", "cannot identify image"),
    (f"{ADM}/train/ai/115_adm_pixels.png", "unreadable", "OSError: unrecognized data stream"),
    (f"{ADM}/train/ai/115_adm_truncated.png", "unreadable", "OSError: image file is truncated"),
    (f"{ADM}/train/nature/.DS_Store", "non_image", "hidden file"),
    (f"{ADM}/train/nature/Thumbs.db", "non_image", r"not an image extension \(\.db\)"),
    (f"{ADM}/train/nature/n01440764_truncated.JPEG", "unreadable", "OSError: .*[Tt]runcated"),
    ("stable_diffusion_v_1_4/cover.jpg", "outside_layout", "not below a {train,val}/{ai,nature}/ folder"),
    (f"{SDV}/notes.txt", "non_image", r"not an image extension \(\.txt\)"),
]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return _release_tree(tmp_path_factory.mktemp("release") / "GenImage")


def _shard_keys(out: Path, manifest: dict) -> dict[str, list[str]]:
    return {e["path"]: list(_tar_samples(out / e["path"])) for e in manifest["shards"]}


def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("shard-*")}


def _without_time(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def test_release_layout_counts_and_skipped_files(tmp_path: Path, release: Path) -> None:
    manifest = shard_genimage(release, tmp_path / "out", max_count=4, workers=1, progress=False).manifest
    assert manifest["counts"] == RELEASE_COUNTS
    files = manifest["skipped"]["files"]
    assert [(f["path"], f["kind"]) for f in files] == [(p, k) for p, k, _ in RELEASE_SKIPPED]
    for f, (_, _, pattern) in zip(files, RELEASE_SKIPPED):
        assert re.search(pattern, f["reason"]), f
        assert "0x" not in f["reason"]  # no memory addresses: reasons are reproducible
    assert {k: manifest["skipped"][k] for k in ("non_image", "outside_layout", "unreadable")} == {
        "non_image": 4, "outside_layout": 1, "unreadable": 4,
    }  # fmt: skip
    assert sum(e["count"] for e in manifest["shards"]) == 20
    assert all(e["count"] <= 4 and e["bytes"] == (tmp_path / "out" / e["path"]).stat().st_size
               for e in manifest["shards"])  # fmt: skip
    assert not any(e["path"].startswith("ADM/val") for e in manifest["shards"])
    assert load_manifest(tmp_path / "out").generators == ["ADM", "stable_diffusion_v_1_4"]


def test_release_colour_modes_are_kept_and_recorded(tmp_path: Path, release: Path) -> None:
    out = tmp_path / "out"
    manifest = shard_genimage(release, out, max_count=100, workers=1, progress=False).manifest
    assert manifest["modes"]["ADM"]["train"] == {
        "ai": {"LA": 1, "P": 1, "RGB": 2, "RGBA": 1},
        "nature": {"CMYK": 1, "L": 1, "RGB": 2},
    }
    assert manifest["modes"]["ADM"]["val"] == {"ai": {}, "nature": {}}
    (entry,) = [e for e in manifest["shards"] if e["path"] == "ADM/train/shard-000000.tar"]
    for key, files in _tar_samples(out / entry["path"]).items():
        meta = json.loads(files["json"])
        image_ext = next(ext for ext in files if ext not in ("json", "cls"))
        assert files[image_ext] == (release / meta["path"]).read_bytes(), key  # stored unchanged
        with Image.open(release / meta["path"]) as original:
            assert (meta["mode"], meta["format"], meta["width"]) == (original.mode, original.format, 16)
        with Image.open(io.BytesIO(files[image_ext])) as img:
            assert to_rgb(img).mode == "RGB"  # what the loader's decode does with every mode
    assert {ext for files in _tar_samples(out / entry["path"]).values() for ext in files} == {
        "png", "webp", "jpg", "json", "cls",
    }  # fmt: skip


def test_generator_filter_on_release_layout(tmp_path: Path, release: Path) -> None:
    manifest = shard_genimage(release, tmp_path / "out", generators=["ADM"], workers=1, progress=False).manifest
    assert list(manifest["counts"]) == ["ADM"]
    assert {s["path"].split("/")[0] for s in manifest["skipped"]["files"]} == {"ADM"}
    with pytest.raises(DataError, match=r"sdv5 not found in .*available: ADM, stable_diffusion_v_1_4"):
        shard_genimage(release, tmp_path / "out2", generators=["sdv5"], workers=1, progress=False)
    with pytest.raises(DataError, match=r"one generator's folder.*--generators imagenet_ai_0508_adm"):
        scan_tree(release / ADM)


def test_workers_give_the_same_shards(tmp_path: Path, release: Path) -> None:
    one = shard_genimage(release, tmp_path / "w1", max_count=3, workers=1, progress=False).manifest
    two = shard_genimage(release, tmp_path / "w2", max_count=3, workers=2, progress=False).manifest
    assert _without_time(one) == _without_time(two)
    assert _shard_keys(tmp_path / "w1", one) == _shard_keys(tmp_path / "w2", two)
    for entry in one["shards"]:
        assert (tmp_path / "w1" / entry["path"]).read_bytes() == (tmp_path / "w2" / entry["path"]).read_bytes()


def test_resume_rewrites_only_the_missing_shard(tmp_path: Path, release: Path) -> None:
    out = tmp_path / "out"
    first = shard_genimage(release, out, max_count=3, workers=1, progress=False).manifest
    before = _mtimes(out)
    victim = first["shards"][1]["path"]
    (out / victim).unlink()
    (out / "manifest.json").unlink()

    report = shard_genimage(release, out, max_count=3, workers=1, progress=False)
    planned = len(list(out.rglob("shard-*.json")))  # one more than listed: a shard of only unreadable files
    assert planned == len(first["shards"]) + 1
    assert (report.written, report.reused) == (1, planned - 1)
    after = _mtimes(out)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {victim, victim.replace(".tar", ".json")}
    assert _without_time(report.manifest) == _without_time(first)
    assert _without_time(json.loads((out / "manifest.json").read_text())) == _without_time(first)


def test_resume_after_a_crash_mid_shard(tmp_path: Path, release: Path, monkeypatch) -> None:
    reference = shard_genimage(release, tmp_path / "ref", max_count=3, workers=1, progress=False).manifest
    out = tmp_path / "out"
    calls = {"n": 0}
    real = shard_write.tar_sample

    def crash_on_the_8th_sample(*args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # the user pressed Ctrl-C inside the third shard
        return real(*args)

    monkeypatch.setattr(shard_write, "tar_sample", crash_on_the_8th_sample)
    with pytest.raises(KeyboardInterrupt):
        shard_genimage(release, out, max_count=3, workers=1, progress=False)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    assert len(list(out.rglob("shard-*.tar.tmp"))) == 1
    finished = _mtimes(out)
    complete = len(list(out.rglob("shard-*.json")))
    assert complete >= 2

    report = shard_genimage(release, out, max_count=3, workers=1, progress=False)
    planned = len(list((tmp_path / "ref").rglob("shard-*.json")))  # includes a shard of only unreadable files
    assert (report.reused, report.written) == (complete, planned - complete)
    assert all(_mtimes(out)[p] == t for p, t in finished.items() if not p.endswith(".tmp"))
    assert not list(out.rglob("*.tmp"))
    assert _without_time(report.manifest) == _without_time(reference)
    assert _shard_keys(out, report.manifest) == _shard_keys(tmp_path / "ref", reference)


def test_changed_source_file_rewrites_its_shard(tmp_path: Path, make_tree) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (6, 6)}}, size=(8, 8))
    out = tmp_path / "out"
    first = shard_genimage(src, out, max_count=4, workers=1, progress=False).manifest
    before = _mtimes(out)
    target = src / "g" / "train" / "ai" / "ai_000.png"
    _noise(12, 99).save(target)  # same name, new content: size and mtime change
    again = shard_genimage(src, out, max_count=4, workers=1, progress=False).manifest
    changed = {p for p, t in _mtimes(out).items() if before[p] != t}
    (owner,) = [
        p
        for p, keys in _shard_keys(out, again).items()
        if any(json.loads(_tar_samples(out / p)[k]["json"])["path"].endswith("ai_000.png") for k in keys)
    ]
    assert changed == {owner, owner.replace(".tar", ".json")}
    assert [e["count"] for e in again["shards"]] == [e["count"] for e in first["shards"]]


def test_max_size_splits_shards_by_bytes(tmp_path: Path, make_tree) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (10, 10)}}, size=(40, 32))
    image_bytes = sum(p.stat().st_size for p in src.rglob("*.*"))
    out = tmp_path / "out"
    manifest = shard_genimage(src, out, max_size="20KB", workers=1, progress=False).manifest
    assert manifest["max_size"] == 20_000
    assert len(manifest["shards"]) >= image_bytes // 20_000 + 1 > 1
    for entry in manifest["shards"]:
        assert 0 < (out / entry["path"]).stat().st_size == entry["bytes"] <= 20_000
    assert sum(e["count"] for e in manifest["shards"]) == 20
    # one image larger than the limit still gets a shard of its own rather than failing the run
    tiny = shard_genimage(src, tmp_path / "tiny", max_size=100, progress=False).manifest
    assert [e["count"] for e in tiny["shards"]] == [1] * 20


def test_parse_size() -> None:
    assert [parse_size(v) for v in ("1GB", "500mb", "2GiB", "1.5KB", "123", 77, None)] == [
        10**9, 5 * 10**8, 2 * 2**30, 1500, 123, 77, None,
    ]  # fmt: skip
    for bad in ("1XB", "GB", "-5", "0"):
        with pytest.raises(DataError, match="size"):
            parse_size(bad)


def test_cli_shard_flags_and_summary(tmp_path: Path, release: Path, capsys) -> None:
    from ds_trainer.cli import main

    out = tmp_path / "out"
    args = ["shard", "--src", str(release), "--out", str(out), "--max-count", "3", "--max-size", "1MB",
            "--workers", "1", "--no-progress", "--seed", "5"]  # fmt: skip
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["max_count"], manifest["max_size"], manifest["seed"]) == (3, 10**6, 5)
    assert line.startswith(f"wrote {len(manifest['shards'])} shards to {out}: 20 images in")
    for part in (
        "ADM/train ai=5 nature=4",
        "ADM/val ai=0 nature=0 (empty)",
        "stable_diffusion_v_1_4/train ai=4 nature=3",
        "stable_diffusion_v_1_4/val ai=2 nature=2",
        "skipped: 4 unreadable, 4 non-image, 1 outside layout",
    ):
        assert part in line, (part, line)
    assert main(args) == 0
    assert f"wrote 0 shards to {out}, {len(manifest['shards'])} kept from an earlier run" in capsys.readouterr().out
    assert main([*args[:-2], "--generators", "nope"]) == 3
    assert "nope not found" in capsys.readouterr().err
    assert main([*args, "--max-size", "lots"]) == 3
    assert "'lots' is not a size" in capsys.readouterr().err


def test_unverified_shards_keep_corrupt_pixels_and_are_not_reused_by_a_verified_run(tmp_path: Path, make_tree) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (3, 3)}}, size=(40, 32))
    png = src / "g" / "train" / "ai" / "ai_000.png"
    png.write_bytes(png.read_bytes()[:200])  # header intact, pixel data cut off
    out = tmp_path / "out"
    loose = shard_genimage(src, out, workers=1, progress=False, verify=False).manifest
    assert (loose["verified"], loose["counts"]["g"]["train"]["total"], loose["skipped"]["unreadable"]) == (False, 6, 0)
    strict = shard_genimage(src, out, workers=1, progress=False)
    assert (strict.reused, strict.written) == (0, 1)
    assert (strict.manifest["verified"], strict.manifest["counts"]["g"]["train"]["total"]) == (True, 5)
    assert [f["path"] for f in strict.manifest["skipped"]["files"]] == ["g/train/ai/ai_000.png"]


def test_write_failure_in_a_worker_is_a_data_error_naming_the_shard(tmp_path: Path, make_tree) -> None:
    src = make_tree(tmp_path / "gi", {"g": {"train": (4, 4)}, "h": {"train": (4, 4)}}, size=(8, 8))
    out = tmp_path / "out"
    (out / "h").mkdir(parents=True)
    (out / "h" / "train").write_text("a file where the shard folder goes")
    with pytest.raises(DataError, match=r"writing shard .*h/train/shard-00000[01].tar failed.*re-run"):
        shard_genimage(src, out, max_count=4, workers=2, progress=False)
    assert not (out / "manifest.json").exists()
