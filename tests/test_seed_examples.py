"""The seed document's Python examples, run with ds_trainer imports on the tiny model.

Each snippet is the seed's code with only the imports changed, `model_name` set to the offline
`tiny` preset and `GenImageDataset(...)` pointed at a small GenImage-layout tree.
"""

import pytest
import torch
from torch.utils.data import DataLoader

from ds_trainer import CLIPModel, GenImageDataset, Trainer
from ds_trainer.data import build_demo_tree


@pytest.fixture(scope="module")
def genimage_root(tmp_path_factory):
    return build_demo_tree(tmp_path_factory.mktemp("genimage"), train_per_class=12, val_per_class=6)


@pytest.fixture
def loaders(genimage_root):
    train_dataset = GenImageDataset(genimage_root, split="train")
    val_dataset = GenImageDataset(genimage_root, split="val")
    train_loader = DataLoader(train_dataset, batch_size=8, shuffle=True)
    val_loader = DataLoader(val_dataset, batch_size=16, shuffle=False)
    return train_loader, val_loader


def test_trainer_example(tmp_path, loaders, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_loader, val_loader = loaders
    model = CLIPModel(model_name="tiny", mode="fine-tune")
    trainer = Trainer(
        model=model,
        train_loader=train_loader,
        val_loader=val_loader,
        optimizer_type="adamw",
        learning_rate=1e-4,
        weight_decay=0.01,
        scheduler_type="cosine",
        num_epochs=2,
        device="cpu",  # the seed says "cuda"; this machine has none
        checkpoint_dir="results/saved_models",
    )
    trainer.train()
    assert (tmp_path / "results/saved_models/epoch_2/ds_trainer.json").is_file()
    assert len((tmp_path / "results/saved_models/metrics.jsonl").read_text().splitlines()) == 2


def test_distributed_flag_and_resume_example(tmp_path, loaders, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_loader, val_loader = loaders
    trainer = Trainer(
        model=CLIPModel(model_name="tiny"),
        train_loader=train_loader,
        val_loader=val_loader,
        distributed=True,
        num_epochs=5,
        save_frequency=5,
        checkpoint_dir="results/saved_models",
    )
    trainer.train()

    # Resume from checkpoint (the seed's path, .pth included)
    trainer = Trainer(
        model=CLIPModel(model_name="tiny"),
        train_loader=train_loader,
        val_loader=val_loader,
        num_epochs=6,
        checkpoint_dir="results/saved_models",
    )
    trainer.resume_from_checkpoint("results/saved_models/epoch_5.pth")
    rows = trainer.train()
    assert [r["epoch"] for r in rows] == [6]


def test_custom_trainer_example(tmp_path, loaders, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []

    def my_custom_loss(outputs, targets):
        seen.append(targets.numel())
        return torch.nn.functional.cross_entropy(outputs.float(), targets)

    class CustomTrainer(Trainer):
        def calculate_loss(self, outputs, targets):
            # Custom loss calculation
            return my_custom_loss(outputs, targets)

    train_loader, val_loader = loaders
    CustomTrainer(
        model=CLIPModel(model_name="tiny"), train_loader=train_loader, val_loader=val_loader, num_epochs=1
    ).train()
    assert sum(seen) == 48 + 24  # every train and val image (2 generators) went through the custom loss


@pytest.mark.parametrize("freeze", [False, True])
def test_fine_tuning_strategies_example(tmp_path, loaders, monkeypatch, freeze):
    monkeypatch.chdir(tmp_path)
    model = CLIPModel(
        model_name="tiny",
        mode="fine-tune",
        freeze_backbone=freeze,
    )
    train_loader, val_loader = loaders
    trainer = Trainer(
        model=model,
        train_loader=train_loader,
        val_loader=val_loader,
        learning_rate=1e-3 if freeze else 5e-5,
        num_epochs=1,
    )
    before = model.backbone.embeddings.patch_embedding.weight.detach().clone()
    trainer.train()
    moved = not torch.equal(before, model.backbone.embeddings.patch_embedding.weight)
    assert moved is (not freeze)


def test_main_py_example(tmp_path, loaders, monkeypatch):
    """`Trainer(model=..., **config.training)` with a YAML config, as the seed's main.py does."""
    from ds_trainer.config import build_config, parse_yaml

    monkeypatch.chdir(tmp_path)
    config = build_config(
        parse_yaml(
            "training:\n  learning_rate: 1e-4\n  num_epochs: 1\n  batch_size: 8\n"
            "  checkpoint_dir: results/main\n  mixed_precision: True\n"
        )
    )
    train_loader, val_loader = loaders
    trainer = Trainer(
        model=CLIPModel(model_name="tiny"), train_loader=train_loader, val_loader=val_loader, **config.training
    )
    trainer.train()
    assert (tmp_path / "results/main/latest").read_text() == "epoch_1"


def test_prompt_tuning_example(tmp_path, loaders, monkeypatch):
    from ds_trainer import PromptTuningWrapper

    monkeypatch.chdir(tmp_path)
    train_loader, val_loader = loaders
    base_model = CLIPModel(model_name="tiny", mode="zero-shot")
    model = PromptTuningWrapper(model=base_model, prompt_length=10)

    trainer = Trainer(
        model=model,
        train_loader=train_loader,
        val_loader=val_loader,
        learning_rate=1e-2,  # Higher learning rate for prompt tuning
        num_epochs=1,
        device="cpu",
        checkpoint_dir="results/saved_models",
    )
    ctx_before = model.prompt_ctx.detach().clone()
    clip_before = {n: p.detach().clone() for n, p in base_model.named_parameters()}
    trainer.train()
    assert not torch.equal(model.prompt_ctx.detach().float(), ctx_before.float())
    assert all(torch.equal(p.detach().float(), clip_before[n].float()) for n, p in base_model.named_parameters())
    assert (tmp_path / "results/saved_models/epoch_1/ds_trainer.json").is_file()
