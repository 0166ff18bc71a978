"""uint8 to the device: the trainer's loaders ship the crops' 8-bit pixels and `batches.unpack` normalises them,
giving the model the inputs the float path gave (bit-identical on a CPU)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ds_trainer import batches
from ds_trainer.data import make_shard_loader
from ds_trainer.data.perturb import parse_perturbations
from ds_trainer.data.transforms import Preprocess, normalize, to_normalized_tensor, to_uint8_tensor
from ds_trainer.evaluation import evaluate
from ds_trainer.export import predict_tensors

ATOL = 1e-6  # float rounding; one uint8 step is 1 / (255 * std) ~ 0.015


def _image(w: int, h: int, seed: int, fmt: str = "PNG") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 2 + np.linspace(0, 120, w, dtype=np.uint8)[None, :, None]
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format=fmt, quality=90)
    return Image.open(io.BytesIO(buf.getvalue()))


SETTINGS = {
    "resize": {},
    "resize+draft": {"draft": True},
    "native": {"crop": "native"},
    "native 5 crops": {"crop": "native", "eval_crops": 5},
    "native 10 crops": {"crop": "native", "eval_crops": 10},
    "blur+jpeg": {"blur_prob": 0.5, "jpeg_prob": 0.5},
    "aligned": {"align_jpeg_quality": 96},
    "perturbed": {"perturb": parse_perturbations(["jpeg:50"])[0]},
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_uint8_output_normalised_is_the_float_output(name, train, fmt):
    settings = {"draft": False, **SETTINGS[name]}
    for seed, (w, h) in enumerate([(96, 80), (50, 41), (200, 64)]):
        outs = []
        for uint8 in (False, True):
            pre = Preprocess(image_size=48, uint8=uint8, **settings)
            outs.append(pre(_image(w, h, seed, fmt), label=1, train=train, rng=random.Random(f"k{seed}")))
        old, new = outs
        assert new.dtype == torch.uint8 and old.dtype == torch.float32 and new.shape == old.shape
        torch.testing.assert_close(normalize(new), old, atol=ATOL, rtol=0)


def test_normalize_matches_to_normalized_tensor_on_every_byte():
    arr = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    assert torch.equal(normalize(to_uint8_tensor(arr)), to_normalized_tensor(arr))  # the same float32 ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpack_normalises_uint8_and_leaves_float_alone(dtype):
    u8 = torch.randint(0, 256, (2, 5, 3, 8, 8), dtype=torch.uint8)
    want = normalize(u8)
    got, labels = batches.unpack({"pixel_values": u8, "labels": torch.tensor([0, 1])}, torch.device("cpu"), dtype)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype)) and labels.tolist() == [0, 1]
    got_float, _ = batches.unpack((want, torch.tensor([0, 1])), torch.device("cpu"), dtype)
    assert torch.equal(got_float, want.to(dtype))  # float input: already normalised, not again


class _Net(torch.nn.Module):
    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32
        return self.head(F.relu(self.conv(x)).amax(dim=(2, 3)))


@pytest.mark.parametrize("crops", [1, 5])
def test_evaluation_scores_uint8_batches_as_float_ones(crops):
    shape = (3, crops, 3, 16, 16) if crops > 1 else (3, 3, 16, 16)
    u8 = [torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(2)]

    def run(pixels: list[torch.Tensor]):
        loader = [{"pixel_values": p, "labels": torch.tensor([0, 1, 1])} for p in pixels]
        return evaluate(_Net(), loader, epoch=0, zero_stage=0, dtype=torch.float32, loss_fn=F.cross_entropy,
                        image_size=16, max_bad_fraction=0.0)  # fmt: skip

    a, b = run(u8), run([normalize(p) for p in u8])
    assert np.array_equal(a.predictions["score"], b.predictions["score"]) and a.row["val_loss"] == b.row["val_loss"]


def test_predict_normalises_uint8_pixels():
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(predict_tensors(_Net(), u8), predict_tensors(_Net(), normalize(u8)))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_uint8_and_the_same_model_inputs(tiny_shards, train, workers):
    def epoch(uint8: bool) -> list[dict]:
        pre = Preprocess(image_size=32, draft=False, blur_prob=0.5, jpeg_prob=0.5, uint8=uint8)
        loader = make_shard_loader(tiny_shards, "train" if train else "val", batch_size=4, train=train,
                                   num_workers=workers, preprocess=pre, seed=3, image_size=32)  # fmt: skip
        loader.set_epoch(1)
        return list(loader)

    old, new = epoch(False), epoch(True)
    assert [b["key"] for b in old] == [b["key"] for b in new] and len(new) > 1
    for a, b in zip(old, new):
        assert b["pixel_values"].dtype == torch.uint8 and a["bad_samples"] == b["bad_samples"]
        x, _ = batches.unpack(b, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(x, a["pixel_values"], atol=ATOL, rtol=0)


def test_the_trainers_loaders_ship_uint8(tiny_shards):
    from ds_trainer.config import Config
    from ds_trainer.distributed import DistEnv
    from ds_trainer.run import build_loaders

    cfg = Config(data={"shards": str(tiny_shards), "image_size": 32, "num_workers": 0, "crop": "native",
                       "eval_crops": 5}, training={"batch_size": 4})  # fmt: skip
    train, val = build_loaders(cfg, DistEnv(rank=0, local_rank=0, world_size=1), train=True)
    assert train.preprocess.uint8 and val.preprocess.uint8
    batch = next(iter(val))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape[1:] == (5, 3, 32, 32)
