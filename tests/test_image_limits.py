"""One bound on what one image may cost, the same for the loader, GenImageDataset, predict and shard.

The hostile files are tiny and real: PNGs of 8 x 12000 and 1 x 100000 pixels (a few KiB), and a
16 x 16 PNG whose header claims 20000 x 20000. Each is refused from its header wherever it is
given, the valid images given with it are still used, and refusing them costs no memory.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import REPO
from PIL import Image

from ds_trainer import cli
from ds_trainer.data import GenImageDataset, shard_genimage
from ds_trainer.data.genimage import BadSample
from ds_trainer.data.image_limits import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    check_size,
    open_checked,
    size_problem,
)
from ds_trainer.data.transforms import resize_shortest_size
from ds_trainer.export import predict_paths

HOSTILE = [(8, 12000), (12000, 8), (1, 100_000), (20_000, 20_000), (8, 8_388_608), (8193, 8193), (33 * 8, 8)]
ADMITTED = [(8, 8), (8, 256), (256, 8), (8192, 8192), (224, 7168), (4000, 125), (MIN_IMAGE_SIDE, 32 * 8)]


def header_png(width: int, height: int) -> bytes:
    """A 16 x 16 PNG whose header says width x height: a decompression bomb in ~100 bytes."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def real_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, "PNG")
    return out.getvalue()


def hostile_files(folder: Path) -> dict[str, Path]:
    """name -> file: the three shapes of the issue, as real files of a few KiB at most."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "8x12000": real_png(8, 12000),
        "1x100000": real_png(1, 100_000),
        "20000x20000": header_png(20_000, 20_000),
        "8x8388608": header_png(8, 8_388_608),
    }
    paths = {}
    for name, data in files.items():
        assert len(data) < 64 * 1024
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(data)
    return paths


def good_image(path: Path, size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)
    return path


class TinyDetector(torch.nn.Module):
    """Stands in for an exported model: predict needs image_size and two logits per image."""

    image_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)


@pytest.mark.unit
@pytest.mark.parametrize("size", HOSTILE)
def test_hostile_shapes_are_refused_by_the_bound(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"image is {size[0]}x{size[1]} pixels"):
        check_size(*size)


@pytest.mark.unit
@pytest.mark.parametrize("image_size", [16, 224, 336])
@pytest.mark.parametrize("size", ADMITTED)
def test_admitted_shapes_resize_within_the_stated_bound(size: tuple[int, int], image_size: int) -> None:
    assert size_problem(*size) is None
    w, h = size
    assert w * h <= MAX_IMAGE_PIXELS
    rw, rh = resize_shortest_size(w, h, image_size)  # what the loader's resize allocates
    assert min(rw, rh) == image_size
    assert rw * rh <= MAX_ASPECT_RATIO * image_size * (image_size + 1)


@pytest.mark.unit
def test_the_bound_the_issue_found_unbounded() -> None:
    # without the aspect bound an 8 x 12000 PNG became 224 x 336000 (75 M pixels) in the resize
    assert resize_shortest_size(8, 12000, 224) == (224, 336000)
    assert "MAX_ASPECT_RATIO (32)" in size_problem(8, 12000)
    assert "MIN_IMAGE_SIDE (8)" in size_problem(1, 100_000)
    assert "MAX_IMAGE_PIXELS" in size_problem(20_000, 20_000)


@pytest.mark.unit
def test_the_loader_check_refuses_the_hostile_files_from_their_header(tmp_path: Path) -> None:
    for name, path in hostile_files(tmp_path).items():
        with pytest.raises(Exception, match="pixels|DecompressionBomb") as err:
            open_checked(path)
        assert type(err.value).__name__ in ("ValueError", "DecompressionBombError", "DecompressionBombWarning"), name


@pytest.mark.unit
def test_predict_skips_the_hostile_files_and_scores_the_rest(tmp_path: Path) -> None:
    hostile = hostile_files(tmp_path / "bad")
    good = [good_image(tmp_path / "a.png"), good_image(tmp_path / "b.jpg", (300, 200))]
    paths = [good[0], *hostile.values(), good[1]]
    results = predict_paths(TinyDetector(), paths, batch_size=2)
    assert [r.path for r in results] == [str(p) for p in paths]
    assert results[0].p_ai is not None and results[-1].p_ai is not None
    for r, path in zip(results[1:-1], hostile.values()):
        assert r.p_ai is None and r.error is not None
        assert str(path) in r.error and "\n" not in r.error
    assert "MAX_ASPECT_RATIO" in results[1].error and "MIN_IMAGE_SIDE" in results[2].error
    assert "DecompressionBomb" in results[3].error


def test_predict_cli_reports_each_bad_image_on_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from ds_trainer import export

    monkeypatch.setattr(export, "load_exported", lambda _model: TinyDetector())
    hostile = hostile_files(tmp_path / "bad")
    good = good_image(tmp_path / "ok.png")
    code = cli.main(["predict", "--model", str(tmp_path / "model"), str(good), *map(str, hostile.values())])
    out, err = capsys.readouterr()
    assert code == 3
    assert out.splitlines()[0].startswith(f"{good}\t") and len(out.splitlines()) == 1
    assert f"{len(hostile)} of {len(hostile) + 1} images unreadable" in err
    for path in hostile.values():
        assert sum(str(path) in line for line in err.splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.unit
def test_genimage_dataset_skips_the_hostile_files(tmp_path: Path) -> None:
    root = tmp_path / "gi"
    hostile = hostile_files(root / "g" / "train" / "ai")
    good_image(root / "g" / "train" / "nature" / "n.jpg")
    ds = GenImageDataset(root, split="train", image_size=16)
    items = {Path(r.path).name: ds[i] for i, r in enumerate(ds.records)}
    assert items["n.jpg"][0].shape == (3, 16, 16)
    for path in hostile.values():
        assert isinstance(items[path.name], BadSample), path.name
    batch = GenImageDataset.collate(list(items.values()))
    assert batch["bad_samples"] == len(hostile) and len(batch["labels"]) == 1


def test_shard_lists_the_hostile_files_as_unreadable(tmp_path: Path) -> None:
    # the manifest counts only what the loader would use, so its counts stay true
    root = tmp_path / "gi"
    hostile = hostile_files(root / "g" / "train" / "ai")
    good_image(root / "g" / "train" / "ai" / "a.png")
    good_image(root / "g" / "train" / "nature" / "n.jpg")
    manifest = shard_genimage(root, tmp_path / "out", workers=1, progress=False).manifest
    assert manifest["counts"]["g"]["train"] == {"ai": 1, "nature": 1, "total": 2}
    skipped = {Path(f["path"]).name: f for f in manifest["skipped"]["files"]}
    for path in hostile.values():
        assert skipped[path.name]["kind"] == "unreadable"
    assert "MAX_ASPECT_RATIO" in skipped["8x12000.png"]["reason"]


_MEASURE = """
import sys
from ds_trainer.export import load_image_tensor
from ds_trainer.errors import DataError


def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))


load_image_tensor(sys.argv[1], 224)  # warm up: imports and the first allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from what is resident now
before = peak_mib()
refused = 0
for path in sys.argv[2:]:
    try:
        load_image_tensor(path, 224)
    except DataError:
        refused += 1
print(refused, peak_mib() - before)
"""


def _peak_mib(warmup: Path, paths: list[Path]) -> tuple[int, int]:
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(warmup), *map(str, paths)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    refused, mib = map(int, run.stdout.split())
    return refused, mib


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc")
def test_no_hostile_image_raises_peak_memory(tmp_path: Path) -> None:
    """The stated bound, measured: refusing the hostile files costs < 16 MiB of peak RSS, while an
    admitted image of 3000 x 3000 (the measurement's positive control) visibly costs its decode."""
    warmup = good_image(tmp_path / "warm.png", (64, 64))
    hostile = list(hostile_files(tmp_path / "bad").values())
    refused, mib = _peak_mib(warmup, hostile)
    assert refused == len(hostile)
    assert mib < 16, f"refusing {len(hostile)} hostile headers raised peak RSS by {mib} MiB"

    big = good_image(tmp_path / "big.png", (3000, 3000))  # 27 MB of RGB once decoded
    refused, mib = _peak_mib(warmup, [big])
    assert refused == 0 and mib >= 20, mib
