"""Native-resolution multi-crop evaluation (`data.crop: native`, `data.eval_crops` / `eval --eval-crops`).

The crop placement against plain numpy slicing; an image's score as the mean of its crops' logits,
each crop scored on its own; images smaller than, equal to and larger than the crop in one eval,
each scored once under its key; ranks simulated in one process (a loader built with rank r of W
reads what rank r of a W-rank job reads) keep the plan and the batches they had with one crop.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_config
from PIL import Image

from ds_trainer.config import EVAL_CROPS, DataSection, build_config
from ds_trainer.data import make_shard_loader, shard_genimage
from ds_trainer.data.native import CROP_PLACEMENTS, crop_windows
from ds_trainer.data.native import EVAL_CROPS as NATIVE_EVAL_CROPS
from ds_trainer.data.transforms import Preprocess, to_normalized_tensor, to_rgb
from ds_trainer.errors import ConfigError
from ds_trainer.evaluation import evaluate, forward_crops
from ds_trainer.metrics import ai_scores

S = 32  # the crop (model input) size of these tests
# smaller than the crop on both axes, equal, larger on both, larger on one axis only, odd margins
SIZES = [(20, 24), (32, 32), (50, 40), (45, 20), (33, 39)]


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _direct_crops(arr: np.ndarray, k: int) -> list[np.ndarray]:
    """The k crops by plain slicing: corners and centre (torchvision's rounding) of the image, tiled
    first so that a side shorter than the crop is covered (there every crop takes the centre window),
    then for k=10 the same five of the mirrored image."""

    def five(a: np.ndarray) -> list[np.ndarray]:
        h, w = a.shape[:2]
        big = np.tile(a, (S // h + 2, S // w + 2, 1))

        def starts(length: int) -> tuple[int, int, int]:
            c = round((length - S) / 2)
            return (0, length - S, c) if length >= S else (c % length,) * 3

        (y0, y1, yc), (x0, x1, xc) = starts(h), starts(w)
        return [big[y : y + S, x : x + S] for y, x in ((y0, x0), (y0, x1), (y1, x0), (y1, x1), (yc, xc))]

    if k == 1:
        return [five(arr)[4]]
    return five(arr) + (five(arr[:, ::-1]) if k == 10 else [])


# ---------------------------------------------------------------- placement


@pytest.mark.unit
@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("wh", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_crops_are_the_numpy_slices_of_the_image(wh: tuple[int, int], k: int) -> None:
    img = _image(*wh, seed=wh[0] * 100 + wh[1])
    out = Preprocess(image_size=S, crop="native", eval_crops=k)(img, 1)
    want = torch.stack([to_normalized_tensor(c) for c in _direct_crops(np.asarray(img), k)])
    if k == 1:  # one crop keeps the single-image shape (what crop: native always gave)
        assert out.shape == (3, S, S) and torch.equal(out, want[0])
    else:
        assert out.shape == (k, 3, S, S) and torch.equal(out, want)


@pytest.mark.unit
def test_placement_in_coordinates() -> None:
    # 50 x 40 with a crop of 32: x in {0, 9, 18}, y in {0, 4, 8}; FiveCrop's order, then the mirror's
    five = [(0, 0), (18, 0), (0, 8), (18, 8), (9, 4)]
    assert crop_windows(50, 40, S, 5) == [(x, y, False) for x, y in five]
    assert crop_windows(50, 40, S, 10) == [(x, y, False) for x, y in five] + [(x, y, True) for x, y in five]
    assert crop_windows(50, 40, S, 1) == [(9, 4, False)]
    # a side shorter than the crop: every crop takes the centre (tiled) window along it
    assert {y for _, y, _ in crop_windows(45, 20, S, 5)} == {round((20 - S) / 2) % 20}
    assert {(x, y) for x, y, _ in crop_windows(20, 24, S, 10)} == {(-6 % 20, -4 % 24)}  # (20-32)/2, (24-32)/2
    with pytest.raises(ValueError, match="eval crops"):
        crop_windows(50, 40, S, 3)


@pytest.mark.unit
def test_small_images_are_tiled_into_identical_crops_and_large_ones_differ() -> None:
    small = Preprocess(image_size=S, crop="native", eval_crops=10)(_image(20, 24, 1), 0)
    assert all(torch.equal(small[i], small[0]) for i in range(5))
    assert all(torch.equal(small[i], small[5]) for i in range(5, 10))
    large = Preprocess(image_size=S, crop="native", eval_crops=5)(_image(50, 40, 2), 0)
    assert len({large[i].sum().item() for i in range(5)}) == 5  # five different windows


@pytest.mark.unit
def test_training_ignores_eval_crops() -> None:
    img = _image(50, 40, 3)
    for seed in range(3):
        a = Preprocess(image_size=S, crop="native", eval_crops=10)(img, 1, train=True, rng=random.Random(seed))
        b = Preprocess(image_size=S, crop="native")(img, 1, train=True, rng=random.Random(seed))
        assert a.shape == (3, S, S) and torch.equal(a, b)


@pytest.mark.unit
def test_config_and_preprocess_agree_and_refuse() -> None:
    assert tuple(EVAL_CROPS) == NATIVE_EVAL_CROPS == tuple(CROP_PLACEMENTS) == (1, 5, 10)
    data = DataSection(crop="native", eval_crops=5, image_size=64)
    assert Preprocess.from_config(data).eval_crops == 5
    assert Preprocess.from_config(DataSection()).eval_crops == 1
    for bad in ({"data.eval_crops": 3}, {"data.eval_crops": 0}, {"data.eval_crops": 5, "data.crop": "resize"}):
        with pytest.raises(ConfigError, match="eval_crops"):
            build_config({}, [f"{k}={v}" for k, v in bad.items()])
    with pytest.raises(ValueError, match="eval_crops 5 needs crop 'native'"):
        Preprocess(image_size=S, eval_crops=5)
    with pytest.raises(ValueError, match="eval_crops must be one of 1, 5, 10"):
        Preprocess(image_size=S, crop="native", eval_crops=2)


# ---------------------------------------------------------------- the score of an image


class _TinyNet(torch.nn.Module):
    """A tiny non-linear detector standing in for the engine: conv, ReLU, pooling, a 2-class head."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.head = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.mul_(20.0)  # logits of a few units, so averaging them and averaging probabilities differ

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4, "the model sees plain [N, 3, S, S] batches"
        return self.head(F.relu(self.conv(x)).amax(dim=(2, 3)))


@pytest.mark.unit
@pytest.mark.parametrize("k", [5, 10])
def test_an_images_logits_are_the_mean_of_its_crops_scored_alone(k: int) -> None:
    net = _TinyNet()
    x = torch.randn(3, k, 3, S, S)
    with torch.no_grad():
        got = forward_crops(net, x)
        alone = torch.stack([torch.stack([net(x[b, c][None])[0] for c in range(k)]) for b in range(3)])
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, alone.mean(dim=1), rtol=1e-5, atol=1e-5)
    # the score is the softmax of the mean logits, not the mean of the crops' probabilities
    torch.testing.assert_close(ai_scores(got), alone.mean(dim=1).softmax(dim=1)[:, 1])
    assert (ai_scores(got) - alone.softmax(dim=2)[..., 1].mean(dim=1)).abs().max() > 1e-3
    plain = torch.randn(4, 3, S, S)  # one crop per image: the batch goes through untouched
    with torch.no_grad():
        assert torch.equal(forward_crops(net, plain), net(plain))


class _ShortLoader:
    """Promises 3 batches and yields 2 (a rank whose last batch held only undecodable files)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches) + 1

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.unit
def test_the_padding_step_of_a_short_rank_feeds_the_model_one_plain_crop() -> None:
    seen: list[tuple[int, ...]] = []
    net = _TinyNet()
    net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    batches = [{"pixel_values": torch.randn(2, 5, 3, S, S), "labels": torch.tensor([0, 1])} for _ in range(2)]
    row = evaluate(net, _ShortLoader(batches), epoch=0, zero_stage=3, dtype=torch.float32,
                   loss_fn=lambda o, t: F.cross_entropy(o, t), image_size=S, max_bad_fraction=0.0)  # fmt: skip
    assert seen == [(10, 3, S, S), (10, 3, S, S), (1, 3, S, S)] and row.row["val_samples"] == 4


# ---------------------------------------------------------------- images of several sizes, one eval


@pytest.fixture(scope="module")
def sized_shards(tmp_path_factory) -> Path:
    """Two generators, each class with one PNG of every size in SIZES (20 images), 3 per shard."""
    root = tmp_path_factory.mktemp("sized")
    for g, gen in enumerate(("g1", "g2")):
        for cls in ("ai", "nature"):
            folder = root / "src" / gen / "val" / cls
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(SIZES):
                _image(w, h, seed=1000 * g + 100 * (cls == "ai") + i).save(folder / f"{cls}_{i}.png")
    shard_genimage(root / "src", root / "shards", max_count=3, progress=False, workers=1)
    return root / "shards"


def _tar_images(shards: Path) -> dict[str, tuple[Image.Image, int]]:
    """key -> (image, label), read from the tars themselves."""
    out: dict[str, tuple[Image.Image, int]] = {}
    for entry in json.loads((shards / "manifest.json").read_text())["shards"]:
        with tarfile.open(shards / entry["path"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".png"):
                key = name[: -len(".png")]
                img = Image.open(io.BytesIO(data))
                img.load()
                out[key] = (to_rgb(img), int(members[f"{key}.cls"]))
    return out


def _evaluate(loader, net: torch.nn.Module) -> tuple[dict, dict]:
    result = evaluate(net, loader, epoch=0, zero_stage=1, dtype=torch.float32,
                      loss_fn=lambda o, t: F.cross_entropy(o.float(), t), image_size=S, max_bad_fraction=0.0)  # fmt: skip
    return result.row, result.predictions


@pytest.mark.parametrize("k, workers", [(1, 0), (5, 2), (10, 0)])
def test_every_size_is_scored_once_under_its_key(sized_shards: Path, k: int, workers: int) -> None:
    truth = _tar_images(sized_shards)
    assert len(truth) == 20 and {im.size for im, _ in truth.values()} == set(SIZES)
    pre = Preprocess(image_size=S, crop="native", eval_crops=k, draft=False)
    loader = make_shard_loader(sized_shards, "val", batch_size=3, train=False, num_workers=workers,
                               image_size=S, preprocess=pre, pin_memory=False)  # fmt: skip
    net = _TinyNet()
    row, pred = _evaluate(loader, net)
    assert sorted(pred["key"]) == sorted(truth) and row["val_samples"] == 20  # each image once
    losses = []
    for key, score, label, size in zip(pred["key"], pred["score"], pred["label"], pred["size"]):
        img, want_label = truth[key]
        assert int(label) == want_label and tuple(size) == img.size, key
        # the image's crops, each scored alone through the model, and their mean logits
        crops = torch.stack([to_normalized_tensor(c) for c in _direct_crops(np.asarray(img), k)])
        with torch.no_grad():
            mean_logits = net(crops).mean(dim=0, keepdim=True)
        assert score == pytest.approx(float(ai_scores(mean_logits)[0]), abs=1e-5), key
        losses.append(float(F.cross_entropy(mean_logits, torch.tensor([want_label]))))
    assert row["val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)  # the loss of each image's mean logits


def test_two_ranks_keep_the_one_crop_plan_and_score_every_image_once(sized_shards: Path) -> None:
    def loader(k: int, rank: int, world: int):
        pre = Preprocess(image_size=S, crop="native", eval_crops=k, draft=False)
        return make_shard_loader(sized_shards, "val", batch_size=2, train=False, rank=rank, world_size=world,
                                 num_workers=1, image_size=S, preprocess=pre, pin_memory=False)  # fmt: skip

    net = _TinyNet()
    _, whole = _evaluate(loader(5, 0, 1), net)
    one_rank = dict(zip(whole["key"], whole["score"]))
    seen: dict[str, float] = {}
    lengths = []
    for rank in range(2):
        multi, single = loader(5, rank, 2), loader(1, rank, 2)
        batches = list(multi)
        # the same batches, of the same images, as with one crop: the crops ride inside each image's row
        assert len(batches) == len(multi) == len(single)
        assert [b["key"] for b in batches] == [b["key"] for b in single]
        assert all(b["pixel_values"].shape == (len(b["key"]), 5, 3, S, S) for b in batches)
        lengths.append(len(multi))
        _, pred = _evaluate(multi, net)
        for key, score in zip(pred["key"], pred["score"]):
            assert key not in seen, f"{key} scored on both ranks"
            seen[key] = score
    assert lengths == [5, 5]  # shards of 3, 3, 3, 1 per generator balance to 10 images (5 batches) per rank
    assert seen.keys() == one_rank.keys()
    for key, score in seen.items():
        assert score == pytest.approx(one_rank[key], abs=1e-6), key


# ---------------------------------------------------------------- the CLI


def test_eval_cli_eval_crops_flag(tmp_path, tiny_shards, monkeypatch):
    from ds_trainer import cli

    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0},
                       logging={"tensorboard": False})  # fmt: skip
    assert cli.main(["train", "--config", str(cfg)]) == 0
    results = {}
    for k in (1, 10):
        out = tmp_path / f"eval_{k}.json"
        argv = ["eval", "--load-dir", str(tmp_path / "ckpt"), "--out", str(out), "--set", "data.num_workers=0",
                "--set", "data.crop=native", "--set", "data.eval_crops=5", "--eval-crops", str(k)]  # fmt: skip
        assert cli.main(argv) == 0
        results[k] = json.loads(out.read_text())
    for k, result in results.items():
        assert (result["crop"], result["eval_crops"], result["samples"]) == ("native", k, 48)  # the flag wins
        assert len(result["predictions"]["score"]) == 48
        assert set(result["generators"]) == {"demo_bicubic", "demo_nearest", "mean"}
    # the demo's images are wider than 224 px: ten crops score them differently from the centre one
    assert results[1]["predictions"]["key"] == results[10]["predictions"]["key"]
    assert results[1]["predictions"]["score"] != results[10]["predictions"]["score"]
