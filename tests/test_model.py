"""Layer 1-2: the CLIP detector: presets, loading from a local HF directory or hub id, freezing."""

import pytest
import torch
import torch.nn.functional as F

from ds_trainer.config import LoraSection, ModelSection
from ds_trainer.errors import ConfigError
from ds_trainer.models import CLIPModel, PromptTuningWrapper, build_model, load_vision_tower
from ds_trainer.models.clip import TINY_TEXT_CONFIG, TINY_VISION_CONFIG

pytestmark = pytest.mark.unit


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


# ---------------------------------------------------------------- speed switches: attention kernel, checkpointing
def _tower(model):
    """The transformers model under a detector (through the prompt-tuning and peft wrappers)."""
    clip = model.model if isinstance(model, PromptTuningWrapper) else model
    return clip.backbone.get_base_model() if hasattr(clip.backbone, "get_base_model") else clip.backbone


def _section(**settings) -> ModelSection:
    # Unvalidated, so these tests check the model code whatever config.py's validators refuse earlier.
    return ModelSection.model_construct(**settings)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("settings", [{}, {"lora": LoraSection(enabled=True)}, {"mode": "zero-shot"},
                                      {"mode": "prompt-tuning"}],
                         ids=["fine-tune", "lora", "zero-shot", "prompt-tuning"])  # fmt: skip
def test_attn_implementation_reaches_every_hf_config(impl, settings):
    config = _tower(build_model(_section(attn_implementation=impl, **settings))).config
    assert {c._attn_implementation for c in (config, *(getattr(config, k) for k in config.sub_configs))} == {impl}


def test_attn_implementation_from_a_local_directory(saved_clip):
    path, _ = saved_clip
    assert CLIPModel(model_name=str(path), attn_implementation="eager").backbone.config._attn_implementation == "eager"
    assert CLIPModel(model_name=str(path)).backbone.config._attn_implementation == "sdpa"


def test_unknown_attn_implementation():
    with pytest.raises(ConfigError, match="model.attn_implementation: 'flash_attention_2' is not supported"):
        CLIPModel(model_name="tiny", attn_implementation="flash_attention_2")


@pytest.mark.parametrize("mode", ["fine-tune", "zero-shot", "prompt-tuning"])
def test_eager_and_sdpa_run_their_own_kernel_and_agree(mode, monkeypatch):
    from transformers.models.clip import modeling_clip

    calls = {"eager": 0, "sdpa": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    # CLIP looks both up at call time: the eager function in its module, sdpa in torch.nn.functional.
    eager = modeling_clip.eager_attention_forward
    monkeypatch.setattr(modeling_clip, "eager_attention_forward", counting("eager", eager))
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting("sdpa", F.scaled_dot_product_attention))
    layers = TINY_VISION_CONFIG["num_hidden_layers"]
    if mode != "fine-tune":
        layers += TINY_TEXT_CONFIG["num_hidden_layers"]
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    reference = build_model(_section(mode=mode, attn_implementation="sdpa"))
    logits = {}
    for impl in ("sdpa", "eager"):
        model = build_model(_section(mode=mode, attn_implementation=impl))
        model.load_state_dict(reference.state_dict())
        model.eval()
        before = dict(calls)
        with torch.no_grad():
            logits[impl] = model(x)
        other = "eager" if impl == "sdpa" else "sdpa"
        assert calls[impl] - before[impl] == layers and calls[other] == before[other], (impl, calls, before)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-5, atol=1e-5)


def _forward_calls_per_step(model, x, y, train: bool) -> int:
    """One forward + backward in train or eval mode (switched as the Trainer does); how often layer 1 ran forward.

    Counted on the layer's first submodule, which runs again when backward recomputes the layer (a hook on the
    layer itself would not: transformers checkpoints the layer's forward, inside its __call__).
    """
    count = [0]
    hook = (
        _tower(model)
        .encoder.layers[1]
        .self_attn.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    )
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same (LoRA) dropout masks in every model
    F.cross_entropy(model(x), y).backward()
    hook.remove()
    return count[0]


@pytest.mark.parametrize("lora", [None, {"r": 4, "dropout": 0.1}], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(lora):
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0])
    grads, runs = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = CLIPModel(model_name="tiny", lora=lora, gradient_checkpointing=checkpointing)
        assert _tower(model).is_activation_checkpointing == checkpointing
        runs[checkpointing] = [_forward_calls_per_step(model, x, y, train) for train in (True, False, True)]
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # Forward calls per step in train, eval, train mode: transformers recomputes in training mode only.
    assert runs == {False: [1, 1, 1], True: [2, 1, 2]}
    assert grads[True].keys() == grads[False].keys()
    assert any(float(g.abs().sum()) > 0 for n, g in grads[True].items() if n.startswith("backbone."))
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("settings, reason", [
    ({"freeze_backbone": True}, "only the head trains"),
    ({"mode": "zero-shot"}, "mode zero-shot keeps no batch-sized activations"),
    ({"mode": "prompt-tuning"}, "prompt-tuning trains only the prompt context"),
], ids=["freeze_backbone", "zero-shot", "prompt-tuning"])  # fmt: skip
def test_gradient_checkpointing_refused_where_nothing_would_be_recomputed(settings, reason):
    with pytest.raises(ConfigError, match=f"model.gradient_checkpointing: .*{reason}"):
        build_model(_section(gradient_checkpointing=True, **settings))


def test_build_model_passes_the_speed_switches():
    model = build_model(ModelSection(attn_implementation="eager", gradient_checkpointing=True))
    assert (model.attn_implementation, model.gradient_checkpointing) == ("eager", True)
    assert model.backbone.config._attn_implementation == "eager" and model.backbone.is_activation_checkpointing
    default = build_model(ModelSection())
    assert default.backbone.config._attn_implementation == "sdpa" and not default.backbone.is_activation_checkpointing
