"""data.resize_shortest: crop resize scales the shortest side to R (not image_size S), then takes the S
crop, as UnivFD's 256-then-224; the same in training, evaluation, prepared sets, export and predict."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ds_trainer import cli
from ds_trainer.config import build_config
from ds_trainer.data.transforms import Preprocess, resize_shortest, to_normalized_tensor
from ds_trainer.errors import ConfigError
from ds_trainer.export import EXPORT_FILE, export_checkpoint, load_exported, predict_tensors
from ds_trainer.models import build_model
from ds_trainer.trainer import Trainer


def _image(w: int = 60, h: int = 45, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.unit
def test_eval_resizes_to_the_given_side_then_takes_the_centre_crop():
    img = _image()
    got = Preprocess(32, resize_shortest=40)(img, 0, train=False)
    big = resize_shortest(img, 40)
    assert big.size == (53, 40)
    left, top = (53 - 32) // 2, (40 - 32) // 2
    assert torch.equal(got, to_normalized_tensor(big.crop((left, top, left + 32, top + 32))))
    assert not torch.equal(got, Preprocess(32)(img, 0, train=False))  # resize to 32 sees more of the image
    assert torch.equal(Preprocess(32, resize_shortest=32)(img, 0, train=False), Preprocess(32)(img, 0, train=False))


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(6))
def test_training_takes_a_random_window_of_the_resized_image(seed):
    import random

    img = _image(seed=seed)
    out = Preprocess(32, resize_shortest=40, uint8=True)(img, 0, train=True, rng=random.Random(seed))
    crop = out.permute(1, 2, 0).numpy()
    big = np.asarray(resize_shortest(img, 40))
    windows = [big[y : y + 32, x : x + 32] for y in range(40 - 31) for x in range(53 - 31)]
    assert any(np.array_equal(crop, w) or np.array_equal(crop, w[:, ::-1]) for w in windows)


@pytest.mark.unit
def test_config_bounds_and_the_preprocess_it_builds():
    cfg = build_config({"data": {"image_size": 224, "resize_shortest": 256}})
    assert Preprocess.from_config(cfg.data).resize_side == 256
    assert Preprocess.from_config(build_config({}).data).resize_side == 224
    for data, message in (({"image_size": 224, "resize_shortest": 200}, "at least 224"),
                          ({"crop": "native", "resize_shortest": 256}, "give crop: resize"),
                          ({"resize_shortest": 4096}, "resize_shortest")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            build_config({"data": data})
    with pytest.raises(ValueError, match="resize_shortest 100 needs crop 'resize' and at least image_size 224"):
        Preprocess(224, resize_shortest=100)


def test_export_records_the_side_and_predict_uses_it(tmp_path, capsys):
    cfg = build_config({
        "model": {"model_name": "tiny"}, "data": {"image_size": 224, "resize_shortest": 320},
        "training": {"num_epochs": 1, "batch_size": 4, "scheduler": "none", "monitor": "train_loss",
                     "checkpoint_dir": str(tmp_path / "ckpt")},
        "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False},
    })  # fmt: skip
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 224, 224), torch.arange(8) % 2)
    Trainer(build_model(cfg.model), DataLoader(data, batch_size=4), config=cfg, device="cpu").train()
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    info = json.loads((out / EXPORT_FILE).read_text())
    assert info["preprocessing"]["resize_shortest"] == 320
    assert "shortest side to 320 px" in info["preprocessing"]["resize"]

    path = tmp_path / "a.png"
    _image(500, 400, seed=3).save(path)
    model = load_exported(out)
    with Image.open(path) as img:
        want = predict_tensors(model, Preprocess(224, resize_shortest=320)(img, 0)[None]).item()
        plain = predict_tensors(model, Preprocess(224)(img, 0)[None]).item()
    assert want != pytest.approx(plain, abs=1e-7)  # the side changes what the model sees
    capsys.readouterr()  # the training's console lines
    assert cli.main(["predict", "--model", str(out), str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["p_ai"] == pytest.approx(want, abs=1e-6)
