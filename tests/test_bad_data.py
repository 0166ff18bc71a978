"""Bad samples inside the shards never stop a run: each is skipped, counted and logged.

Every test breaks its own copy of the tiny shard set, reads the whole val split with an eval
loader (in a DataLoader worker process, where the counting happens) and checks the exact number
of good samples, the exact `bad_samples` total, and that the log names the shard file and the key.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ds_trainer.data import make_shard_loader
from ds_trainer.data.decode import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE

SIZE = 16  # tiny model input keeps the suite fast; the checks run before preprocessing
VAL = 48  # tiny_shards' val split: 2 generators x (a shard of 20 + a shard of 4)
Members = list[tuple[tarfile.TarInfo, bytes]]


@pytest.fixture
def shards(tmp_path: Path, tiny_shards: Path) -> Path:
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    return root


@pytest.fixture
def log_file(tmp_path: Path):
    """The loader's warnings, those of forked DataLoader workers included (they inherit the handler)."""
    path = tmp_path / "loader.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    log = logging.getLogger("ds_trainer.data.pipeline")
    level = log.level
    log.setLevel(logging.WARNING)
    log.addHandler(handler)
    yield path
    log.removeHandler(handler)
    log.setLevel(level)
    handler.close()


def _shard(root: Path, generator: str, index: int) -> Path:
    entries = [
        e
        for e in json.loads((root / "manifest.json").read_text())["shards"]
        if e["generator"] == generator and e["split"] == "val"
    ]
    return root / entries[index]["path"]


def _members(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write(path: Path, members: Members) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member, data in members:
            member = copy.copy(member)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    path.write_bytes(out.getvalue())


def _keys(members: Members) -> list[str]:
    return list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))


def _images(members: Members, ext: str) -> list[str]:
    """Keys whose image member has extension `ext`."""
    return [m.name.split(".", 1)[0] for m, _ in members if m.name.endswith(f".{ext}")]


def _replace_images(members: Members, new: dict[str, bytes]) -> Members:
    """`members` with the image of each key in `new` replaced (the member name is kept)."""
    out = []
    for m, d in members:
        stem, ext = m.name.split(".", 1)
        out.append((m, new.get(stem, d) if ext in ("png", "jpg") else d))
    return out


def _loader(root: Path, num_workers: int = 1):
    return make_shard_loader(root, "val", batch_size=4, train=False, num_workers=num_workers, image_size=SIZE)


def _read_all(root: Path, num_workers: int = 1) -> tuple[list[str], int]:
    return _epoch(_loader(root, num_workers))


def _epoch(loader) -> tuple[list[str], int]:
    """(keys yielded, bad_samples total) of one full eval epoch; no empty batch may reach the trainer."""
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert all(b["key"] and len(b["key"]) == len(b["labels"]) == len(b["pixel_values"]) for b in batches)
    assert len(keys) == len(set(keys))
    return keys, sum(b["bad_samples"] for b in batches)


def _logged(log_file: Path, *words: str) -> bool:
    """Whether one line of the log holds all `words`."""
    return any(all(w in line for w in words) for line in log_file.read_text().splitlines())


def _png(width: int, height: int) -> bytes:
    """A 16 x 16 PNG whose header says width x height: a decompression bomb in 100 bytes."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "PNG")
    data = bytearray(out.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, fmt)
    return out.getvalue()


def test_truncated_tar_counts_every_sample_it_lost(shards: Path, log_file: Path) -> None:
    path = _shard(shards, "demo_bicubic", 0)  # 20 samples
    members = _members(path)
    cut_key = _keys(members)[6]
    with tarfile.open(path) as tar:
        image = tar.getmember(f"{cut_key}.{'png' if cut_key in _images(members, 'png') else 'jpg'}")
    path.write_bytes(path.read_bytes()[: image.offset_data + image.size // 2])  # mid image of sample 6
    keys, bad = _read_all(shards)
    assert (len(keys), bad) == (VAL - 14, 14)  # samples 0-5 read; 6 lost its image; 7-19 never came
    assert cut_key not in keys
    assert _logged(log_file, str(path), cut_key, "no image member")
    assert _logged(log_file, str(path), "gave 7 of the 20 samples", f"last read: {cut_key}", "13 unread")


@pytest.mark.parametrize(
    "num_workers, empty",
    [
        (1, [("demo_nearest", 1)]),  # the last shard: the stream ends on bad samples, no batch follows
        (2, [("demo_nearest", 1)]),  # the same in worker 1, after 5 full batches: a batch of no sample
        (2, [("demo_bicubic", 0), ("demo_bicubic", 1)]),  # all of worker 0: its only batch is empty
    ],
)
def test_zero_byte_tar_counts_its_manifest_samples(
    shards: Path, log_file: Path, num_workers: int, empty: list[tuple[str, int]]
) -> None:
    paths = [_shard(shards, *e) for e in empty]
    for path in paths:
        path.write_bytes(b"")
    lost = sum(20 if index == 0 else 4 for _, index in empty)
    keys, bad = _read_all(shards, num_workers=num_workers)
    assert (len(keys), bad) == (VAL - lost, lost)
    for path in paths:
        assert _logged(log_file, str(path), "empty file")
        assert _logged(log_file, str(path), "gave 0 of the", "none read")


@pytest.mark.parametrize("num_workers", [1, 2])
@pytest.mark.parametrize("when", ["before", "after"])
def test_shard_missing_on_disk_counts_its_manifest_samples(
    shards: Path, log_file: Path, num_workers: int, when: str
) -> None:
    # Missing when the run starts (load_manifest warns), or vanishing after the loader was made
    # (a network file system, a cleanup job): either way its samples are counted as bad.
    path = _shard(shards, "demo_bicubic", 0)  # 20 samples
    if when == "before":
        path.unlink()
    loader = _loader(shards, num_workers)
    if when == "after":
        path.unlink()
    keys, bad = _epoch(loader)
    assert (len(keys), bad) == (VAL - 20, 20)
    assert _logged(log_file, str(path), "FileNotFoundError")
    assert _logged(log_file, str(path), "0 of the 20 samples", "20 unread are counted as bad")


def test_sample_without_label(shards: Path, log_file: Path) -> None:
    path = _shard(shards, "demo_bicubic", 0)
    members = _members(path)
    key = _keys(members)[3]
    _write(path, [(m, d) for m, d in members if m.name != f"{key}.cls"])
    keys, bad = _read_all(shards)
    assert (len(keys), bad) == (VAL - 1, 1)
    assert key not in keys
    assert _logged(log_file, str(path), key, "no .cls member")


def test_label_outside_0_1(shards: Path, log_file: Path) -> None:
    path = _shard(shards, "demo_nearest", 0)
    members = _members(path)
    seven, text = _keys(members)[2], _keys(members)[9]
    labels = {f"{seven}.cls": b"7", f"{text}.cls": b"abc"}
    _write(path, [(m, labels.get(m.name, d)) for m, d in members])
    keys, bad = _read_all(shards)
    assert (len(keys), bad) == (VAL - 2, 2)
    assert seven not in keys and text not in keys
    assert _logged(log_file, str(path), seven, "label 7 is neither 0 (nature) nor 1 (ai)")
    assert _logged(log_file, str(path), text, "ValueError", "b'abc'")


def test_images_below_min_side_are_refused_at_any_format(shards: Path, log_file: Path) -> None:
    assert MIN_IMAGE_SIDE == 8
    path = _shard(shards, "demo_bicubic", 0)
    members = _members(path)
    png, jpg = _images(members, "png"), _images(members, "jpg")
    _write(path, _replace_images(members, {  # 3 refused, and the smallest allowed size
        png[0]: _encoded((1, 1), "PNG"), jpg[0]: _encoded((1, 1), "JPEG"),
        png[1]: _encoded((7, 64), "PNG"), jpg[1]: _encoded((8, 8), "JPEG"),
    }))  # fmt: skip
    keys, bad = _read_all(shards)
    assert (len(keys), bad) == (VAL - 3, 3)
    assert jpg[1] in keys
    for key, size in ((png[0], "1x1"), (jpg[0], "1x1"), (png[1], "7x64")):
        assert key not in keys
        assert _logged(log_file, str(path), key, f"image is {size} pixels, a side is below MIN_IMAGE_SIDE (8)")


def test_decompression_bomb_is_refused_from_its_header(shards: Path, log_file: Path) -> None:
    # three paths: PIL's error (above twice Image.MAX_IMAGE_PIXELS), PIL's warning (above it),
    # ours (above MAX_IMAGE_PIXELS, below PIL's limit). The pixel data says 16 x 16, so the log's
    # reason shows the image was refused from its header, not by a failed decode.
    side = int(MAX_IMAGE_PIXELS**0.5) + 8
    assert side * side < Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS < 20_000 * 20_000
    path = _shard(shards, "demo_nearest", 0)
    members = _members(path)
    png = _images(members, "png")
    bombs = {png[0]: (20_000, "DecompressionBombError"), png[1]: (10_000, "DecompressionBombWarning"),
             png[2]: (side, "over MAX_IMAGE_PIXELS")}  # fmt: skip
    _write(path, _replace_images(members, {key: _png(n, n) for key, (n, _) in bombs.items()}))
    keys, bad = _read_all(shards)
    assert (len(keys), bad) == (VAL - 3, 3)
    for key, (_, reason) in bombs.items():
        assert key not in keys
        assert _logged(log_file, str(path), key, reason)


def test_duplicate_keys_in_a_shard_count_the_repeats(shards: Path, log_file: Path) -> None:
    # webdataset merges an adjacent repeat into the first sample (and drops its members with an
    # error), and yields a later repeat as a second sample: both must be counted as bad instead
    path = _shard(shards, "demo_bicubic", 0)
    members = _members(path)
    k = _keys(members)
    rename = {k[1]: k[0], k[5]: k[3]}  # adjacent repeat of k0, repeat of k3 two samples later
    renamed = []
    for m, d in members:
        stem, ext = m.name.split(".", 1)
        m = copy.copy(m)
        m.name = f"{rename.get(stem, stem)}.{ext}"
        renamed.append((m, d))
    _write(path, renamed)
    keys, bad = _read_all(shards)
    assert (len(keys), bad) == (VAL - 2, 2)
    assert k[0] in keys and k[3] in keys and k[1] not in keys and k[5] not in keys
    for key in (k[0], k[3]):
        assert _logged(log_file, str(path), f"skipping sample {key}", "its key came earlier in the shard")
