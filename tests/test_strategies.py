"""Layer 1: the training strategies (full, partial, zero-shot, prompt tuning, LoRA) on the tiny CLIP.

For each strategy: exactly which parameters train, that an optimizer step moves those and no
others, and the parameter-naming contract the Trainer's learning-rate groups rely on.
"""

import pytest
import torch

from ds_trainer.config import ModelSection
from ds_trainer.errors import ConfigError
from ds_trainer.models import CLIPModel, PromptTuningWrapper, build_model, load_clip
from ds_trainer.models.prompt_tuning import encode_text_embeddings

pytestmark = pytest.mark.unit

LABELS = torch.tensor([0, 1, 0, 1])


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(7))


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def sgd_steps(model: torch.nn.Module, steps: int = 1, lr: float = 0.5) -> set[str]:
    """Names of the parameters that changed after `steps` SGD steps on a cross-entropy loss."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images()), LABELS).backward()
        opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def tiny(strategy: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if strategy == "full":
        return CLIPModel(model_name="tiny")
    if strategy == "partial":
        return CLIPModel(model_name="tiny", freeze_backbone=True)
    if strategy == "zero-shot":
        return CLIPModel(model_name="tiny", mode="zero-shot")
    if strategy == "prompt-tuning":
        return PromptTuningWrapper(CLIPModel(model_name="tiny", mode="zero-shot"), prompt_length=4)
    if strategy == "lora":
        return CLIPModel(
            model_name="tiny", lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
        )
    raise AssertionError(strategy)


STRATEGIES = ["full", "partial", "zero-shot", "prompt-tuning", "lora"]


# ---------------------------------------------------------------- what trains
def test_full_fine_tune_trains_everything():
    model = tiny("full")
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_partial_fine_tune_trains_the_head_only():
    assert trainable(tiny("partial")) == {"head.weight", "head.bias"}


def test_zero_shot_trains_nothing():
    model = tiny("zero-shot")
    assert trainable(model) == set()
    names = {n for n, _ in model.named_parameters()}
    assert {"backbone.text_projection.weight", "backbone.visual_projection.weight"} <= names
    # A buffer: frozen anyway, and DeepSpeed cannot broadcast a 0-dim parameter.
    assert "backbone.logit_scale" in dict(model.named_buffers()) and "backbone.logit_scale" in model.state_dict()
    assert any(n.startswith("backbone.text_model.") for n in names)
    assert any(n.startswith("backbone.vision_model.") for n in names)


def test_prompt_tuning_trains_the_context_only():
    model = tiny("prompt-tuning")
    assert trainable(model) == {"prompt_ctx"}
    assert model.prompt_ctx.shape == (4, model.model.backbone.config.text_config.hidden_size)
    assert 0.005 < float(model.prompt_ctx.detach().std()) < 0.05  # CoOp's N(0, 0.02)


def test_lora_trains_adapters_and_head():
    model = tiny("lora")
    names = trainable(model)
    assert {"head.weight", "head.bias"} <= names
    adapters = names - {"head.weight", "head.bias"}
    assert adapters and all(is_lora(n) for n in adapters)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in adapters} == {"q_proj", "v_proj"}
    assert len(adapters) == 4 * 2 * 2  # 4 layers x (q, v) x (A, B)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_naming_contract(strategy):
    """CLIP weights carry a `backbone` name component; the head is `head.*`, the context `prompt_ctx`."""
    for name, _ in tiny(strategy).named_parameters():
        if name.startswith("head.") or name == "prompt_ctx":
            continue
        assert "backbone" in name.split("."), name


# ---------------------------------------------------------------- one optimizer step
def test_full_fine_tune_step_moves_backbone_and_head():
    changed = sgd_steps(tiny("full"))
    assert {"head.weight", "head.bias"} <= changed
    assert any(n.startswith("backbone.") for n in changed)


def test_prompt_tuning_gradients_reach_the_context_only():
    model = tiny("prompt-tuning")
    torch.nn.functional.cross_entropy(model(images()), LABELS).backward()
    assert model.prompt_ctx.grad is not None and float(model.prompt_ctx.grad.abs().sum()) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n != "prompt_ctx")


def test_prompt_tuning_sgd_step_changes_only_the_context():
    assert sgd_steps(tiny("prompt-tuning")) == {"prompt_ctx"}


def test_lora_sgd_steps_change_only_adapters_and_head():
    model = tiny("lora")
    # LoRA's B starts at zero, so A only receives gradient from the second step on.
    changed = sgd_steps(model, steps=2, lr=0.1)
    assert changed == trainable(model)
    assert all(is_lora(n) or n.startswith("head.") for n in changed)


def test_frozen_towers_stay_in_eval_mode():
    for strategy in ("partial", "zero-shot", "prompt-tuning"):
        model = tiny(strategy).train()
        inner = model.model if strategy == "prompt-tuning" else model
        assert model.training and not inner.backbone.training, strategy
    lora = tiny("lora").train()
    assert lora.backbone.training  # LoRA dropout must be active while training


# ---------------------------------------------------------------- zero-shot
def test_zero_shot_forward_is_two_finite_deterministic_logits():
    model = tiny("zero-shot").eval()
    x = images(3)
    out = model(x)
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    assert torch.equal(out, model(x))
    assert model.image_size == 224


def test_zero_shot_logits_are_clips_image_text_logits():
    model = tiny("zero-shot").eval()
    ids, _ = model.tokenize_prompts()
    x = images(3)
    with torch.no_grad():
        expected = model.backbone(input_ids=ids, pixel_values=x).logits_per_image
    torch.testing.assert_close(model(x), expected)


def test_zero_shot_prompt_embeddings_follow_the_prompts():
    model = tiny("zero-shot").eval()
    x = images(2)
    first = model(x)
    model.ai_prompt = "a synthetic picture"
    second = model(x)
    assert torch.equal(first[:, 0], second[:, 0]) and not torch.equal(first[:, 1], second[:, 1])
    assert "prompt_embeds" not in model.state_dict()  # derived, never checkpointed


def test_zero_shot_rejects_training_options():
    with pytest.raises(ConfigError, match="model.num_classes"):
        CLIPModel(model_name="tiny", mode="zero-shot", num_classes=3)
    with pytest.raises(ConfigError, match="model.lora"):
        CLIPModel(model_name="tiny", mode="zero-shot", lora={"r": 4})
    with pytest.raises(ConfigError, match="PromptTuningWrapper"):
        CLIPModel(model_name="tiny", mode="prompt-tuning")


# ---------------------------------------------------------------- tokenizer and loading
def test_tiny_tokenizer_round_trips_the_prompts_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, tokenizer = load_clip("tiny")
    for prompt in ("a real photo", "an AI-generated image", "Ünïcödé & émoji 🙂"):
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        # CLIP lower-cases and splits punctuation off words; the characters survive.
        assert decoded.replace(" ", "") == prompt.lower().replace(" ", "")
    assert tokenizer.decode(tokenizer("a real photo").input_ids, skip_special_tokens=True) == "a real photo"
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # highest id, as CLIP's legacy EOS pooling expects


@pytest.fixture(scope="module")
def saved_full_clip(tmp_path_factory):
    """The tiny CLIP and its tokenizer written with save_pretrained, as a hub download would be."""
    torch.manual_seed(3)
    hf, tokenizer = load_clip("tiny")
    path = tmp_path_factory.mktemp("clip") / "tiny-full"
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, hf


def test_full_clip_directory_loads_for_zero_shot(saved_full_clip):
    path, hf = saved_full_clip
    model = CLIPModel(model_name=str(path), mode="zero-shot").eval()
    assert all(torch.equal(p, hf.state_dict()[n.removeprefix("backbone.")]) for n, p in model.state_dict().items())
    ids, _ = model.tokenize_prompts()
    x = images(2)
    with torch.no_grad():
        expected = hf.eval()(input_ids=ids, pixel_values=x).logits_per_image
    torch.testing.assert_close(model(x), expected)


def test_full_clip_directory_loads_for_fine_tune_and_prompt_tuning(saved_full_clip):
    path, hf = saved_full_clip
    model = build_model(ModelSection(model_name=str(path)))
    theirs = {k.removeprefix("vision_model."): v for k, v in hf.vision_model.state_dict().items()}
    assert all(torch.equal(v, theirs[k]) for k, v in model.backbone.state_dict().items())
    tuned = build_model(ModelSection(model_name=str(path), mode="prompt-tuning", prompt_length=3))
    assert tuned(images(2)).shape == (2, 2)


def test_full_clip_directory_without_tokenizer(tmp_path, saved_full_clip):
    _, hf = saved_full_clip
    hf.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no tokenizer files"):
        CLIPModel(model_name=str(tmp_path), mode="zero-shot")


def test_vision_only_directory_is_refused_for_zero_shot(tmp_path):
    tiny("full").backbone.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="need a full CLIP"):
        CLIPModel(model_name=str(tmp_path), mode="zero-shot")
    assert CLIPModel(model_name=str(tmp_path)).image_size == 224  # fine for fine-tune


# ---------------------------------------------------------------- prompt tuning
def test_prompt_text_path_equals_clip_text_model_without_context():
    """The inputs_embeds path (causal mask, EOS pooling) reproduces CLIPTextModel on the same tokens."""
    model = tiny("zero-shot")
    text = model.backbone.text_model
    ids, eos = model.tokenize_prompts()
    assert ids.shape[0] == 2 and eos[0] != eos[1]  # one prompt is padded: the causal mask matters
    with torch.no_grad():
        ours = encode_text_embeddings(text, text.embeddings.token_embedding(ids), eos)
        theirs = text(input_ids=ids).pooler_output
    torch.testing.assert_close(ours, theirs)


def test_prompt_tuning_context_changes_the_scores():
    model = tiny("prompt-tuning").eval()
    x = images(2)
    before = model(x).detach()
    with torch.no_grad():
        # Random, not a constant shift: each layer norm would remove a shift shared by all features.
        model.prompt_ctx.add_(torch.randn(model.prompt_ctx.shape, generator=torch.Generator().manual_seed(1)))
    after = model(x)
    assert after.shape == (2, 2) and not torch.allclose(after, before)
    assert model.image_size == 224 and model.mode == "prompt-tuning" and model.model_name == "tiny"


def test_prompt_tuning_needs_a_zero_shot_model():
    with pytest.raises(ConfigError, match="mode='zero-shot'"):
        PromptTuningWrapper(CLIPModel(model_name="tiny"), prompt_length=4)


def test_prompt_too_long_for_clips_context():
    with pytest.raises(ConfigError, match="prompt_length"):
        PromptTuningWrapper(CLIPModel(model_name="tiny", mode="zero-shot"), prompt_length=70)


# ---------------------------------------------------------------- LoRA
def test_lora_unknown_target_lists_valid_modules():
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: qproj not found.*q_proj.*v_proj"):
        CLIPModel(model_name="tiny", lora={"target_modules": ["qproj"]})


def test_lora_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="model.lora.r"):
        CLIPModel(model_name="tiny", lora={"r": 0})
    with pytest.raises(ConfigError, match="unknown key model.lora.rank"):
        CLIPModel(model_name="tiny", lora={"rank": 4})
    with pytest.raises(ConfigError, match="freeze_backbone"):
        CLIPModel(model_name="tiny", freeze_backbone=True, lora={"r": 4})


def test_lora_disabled_section_is_plain_fine_tune():
    model = CLIPModel(model_name="tiny", lora={"enabled": False})
    assert not any(is_lora(n) for n, _ in model.named_parameters())


# ---------------------------------------------------------------- build_model
@pytest.mark.parametrize(
    "settings, strategy",
    [
        ({}, "full"),
        ({"freeze_backbone": True}, "partial"),
        ({"mode": "zero-shot"}, "zero-shot"),
        ({"mode": "prompt-tuning", "prompt_length": 5}, "prompt-tuning"),
        ({"lora": {"enabled": True, "r": 2, "target_modules": ["k_proj"]}}, "lora"),
    ],
)
def test_build_model_maps_each_mode(settings, strategy):
    section = ModelSection(model_name="tiny", real_prompt="a photograph", ai_prompt="a rendering", **settings)
    model = build_model(section)
    names = trainable(model)
    if strategy == "full":
        assert names == {n for n, _ in model.named_parameters()}
    elif strategy == "partial":
        assert names == {"head.weight", "head.bias"}
    elif strategy == "zero-shot":
        assert names == set() and model.prompts == ("a photograph", "a rendering")
    elif strategy == "prompt-tuning":
        assert isinstance(model, PromptTuningWrapper) and names == {"prompt_ctx"}
        assert model.prompt_length == 5 and model.model.prompts == ("a photograph", "a rendering")
    else:
        lora = names - {"head.weight", "head.bias"}
        assert lora and all(is_lora(n) and ".k_proj." in n for n in lora)
        assert model.backbone.peft_config["default"].r == 2
