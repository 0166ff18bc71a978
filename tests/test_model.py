"""Layer 1-2: the CLIP detector: presets, loading from a local HF directory or hub id, freezing."""

import pytest
import torch

from ds_trainer.errors import ConfigError
from ds_trainer.models import CLIPModel, load_vision_tower
from ds_trainer.models.clip import TINY_VISION_CONFIG


def test_tiny_forward_gives_two_logits():
    torch.manual_seed(0)
    model = CLIPModel(model_name="tiny")
    out = model(torch.randn(3, 3, 224, 224))
    assert out.shape == (3, 2)
    assert model.image_size == 224


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """A full (vision + text) CLIP written with save_pretrained, as a hub download would be."""
    from transformers import CLIPConfig
    from transformers import CLIPModel as HFCLIPModel

    torch.manual_seed(1)
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    hf = HFCLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION_CONFIG, projection_dim=64))
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    hf.save_pretrained(path)
    return path, hf


def test_loads_vision_tower_from_local_directory(saved_clip):
    path, hf = saved_clip
    model = CLIPModel(model_name=str(path))
    ours = model.backbone.state_dict()
    theirs = {k.removeprefix("vision_model."): v for k, v in hf.vision_model.state_dict().items()}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not load 'openai/clip-vit-nonexistent-zz'"):
        load_vision_tower("openai/clip-vit-nonexistent-zz")


@pytest.mark.parametrize("name", ["not a model", "./missing/dir/x", "/abs/missing"])
def test_neither_directory_nor_hub_id(name):
    with pytest.raises(ConfigError, match="model.model_name"):
        load_vision_tower(name)


def test_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_vision_tower(str(tmp_path))


def test_unknown_mode():
    with pytest.raises(ConfigError, match="model.mode"):
        CLIPModel(model_name="tiny", mode="telepathy")


def test_freeze_backbone_trains_only_the_head():
    torch.manual_seed(0)
    model = CLIPModel(model_name="tiny", freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 224, 224)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone."))
    assert model.head.weight.grad is not None
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.weight", "head.bias"}
    model.train()
    assert model.training and not model.backbone.training


def test_full_finetune_trains_everything():
    model = CLIPModel(model_name="tiny", freeze_backbone=False)
    assert all(p.requires_grad for p in model.parameters())


def test_zero_shot_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not load 'openai/clip-vit-nonexistent-zz'"):
        CLIPModel(model_name="openai/clip-vit-nonexistent-zz", mode="zero-shot")


def test_missing_tokenizer_is_not_an_empty_vocabulary(tmp_path):
    """transformers turns a tokenizer without files into a 3-token vocabulary; that must be an error."""
    from transformers import CLIPTokenizer

    from ds_trainer.models.loading import _load_tokenizer

    with pytest.raises(ConfigError, match="no tokenizer files found for 'somewhere'"):
        _load_tokenizer(CLIPTokenizer, str(tmp_path), "somewhere")
