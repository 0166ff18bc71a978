"""Layer 1: config loading and validation; every error names the dotted key."""

import pytest

from ds_trainer.config import Config, build_config, load_config, parse_yaml
from ds_trainer.errors import ConfigError

pytestmark = pytest.mark.unit

SEED_TRAINING = """
training:
  optimizer: "adamw"
  learning_rate: 1e-4
  weight_decay: 0.01
  momentum: 0.9  # For SGD
  scheduler: "cosine"
  warmup_epochs: 1
  min_lr: 1e-6
  num_epochs: 10
  batch_size: 32
  grad_accumulation_steps: 1
  checkpoint_dir: "results/saved_models"
  save_frequency: 1  # Save every epoch
  early_stopping: True
  patience: 3
  mixed_precision: True
  clip_grad_norm: 1.0
"""


def error_of(tree, overrides=()):
    with pytest.raises(ConfigError) as exc:
        build_config(tree, overrides)
    return str(exc.value)


def test_seed_training_block_loads_with_yaml12_floats():
    cfg = build_config(parse_yaml(SEED_TRAINING))
    t = cfg.training
    assert t.learning_rate == 1e-4 and isinstance(t.learning_rate, float)
    assert t.min_lr == 1e-6
    assert (t.optimizer, t.scheduler, t.num_epochs, t.batch_size) == ("adamw", "cosine", 10, 32)
    assert t.early_stopping is True and t.mixed_precision is True and t.clip_grad_norm == 1.0


def test_training_accepts_every_seed_key():
    keys = set(parse_yaml(SEED_TRAINING)["training"])
    assert keys <= set(Config().training.keys())


def test_training_section_unpacks_like_a_mapping():
    cfg = build_config(parse_yaml(SEED_TRAINING))
    kwargs = dict(**cfg.training)
    assert kwargs["learning_rate"] == 1e-4 and set(kwargs) == set(cfg.training.keys())


def test_unknown_key_suggests_closest():
    msg = error_of({"training": {"learnig_rate": 1e-4}})
    assert "unknown key training.learnig_rate — did you mean training.learning_rate?" in msg


def test_unknown_section_suggests_closest():
    assert "unknown key trainig — did you mean training?" in error_of({"trainig": {}})


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = error_of({"deepspeed": {"zzz": 1}})
    assert "unknown key deepspeed.zzz" in msg and "zero_stage" in msg


@pytest.mark.parametrize(
    "tree, needle",
    [
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate"),
        ({"training": {"learning_rate": -1e-3}}, "training.learning_rate"),
        ({"training": {"batch_size": 0}}, "training.batch_size"),
        ({"training": {"batch_size": 8.5}}, "training.batch_size"),
        ({"training": {"num_epochs": 0}}, "training.num_epochs"),
        ({"training": {"grad_accumulation_steps": 0}}, "training.grad_accumulation_steps"),
        ({"training": {"optimizer": "lamb"}}, "training.optimizer"),
        ({"training": {"scheduler": "linear"}}, "training.scheduler"),
        ({"training": {"momentum": 1.5}}, "training.momentum"),
        ({"training": {"clip_grad_norm": -1}}, "training.clip_grad_norm"),
        ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage"),
        ({"deepspeed": {"precision": "fp8"}}, "deepspeed.precision"),
        ({"data": {"num_workers": -1}}, "data.num_workers"),
        ({"model": {"freeze_backbone": "maybe"}}, "model.freeze_backbone"),
    ],
)
def test_wrong_type_or_range_names_key_and_value(tree, needle):
    msg = error_of(tree)
    assert needle in msg
    value = next(iter(next(iter(tree.values())).values()))
    assert repr(value) in msg


def test_min_lr_above_learning_rate():
    msg = error_of({"training": {"learning_rate": 1e-4, "min_lr": 1e-3}})
    assert "min_lr" in msg and "learning_rate" in msg


def test_warmup_longer_than_training():
    assert "warmup_epochs" in error_of({"training": {"num_epochs": 2, "warmup_epochs": 3}})


def test_all_errors_reported_at_once():
    msg = error_of({"training": {"batch_size": 0, "num_epochs": 0}})
    assert "training.batch_size" in msg and "training.num_epochs" in msg


def test_set_overrides_any_key_with_yaml_typed_values():
    cfg = build_config(
        parse_yaml(SEED_TRAINING),
        [
            "training.learning_rate=3e-5",
            "deepspeed.zero_stage=2",
            "data.train_generators=[adm, glide]",
            "training.clip_grad_norm=null",
            "model.freeze_backbone=true",
        ],
    )
    assert cfg.training.learning_rate == 3e-5
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.data.train_generators == ["adm", "glide"]
    assert cfg.training.clip_grad_norm is None
    assert cfg.model.freeze_backbone is True


def test_set_unknown_key_and_bad_syntax():
    assert "did you mean training.batch_size?" in error_of({}, ["training.batchsize=4"])
    assert "expected KEY=VALUE" in error_of({}, ["training.batch_size"])
    assert "seed" in error_of({}, ["seed.x=1"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  learning_rate: 1e-4\n  batch_size: [32\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and "line" in str(exc.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_shipped_configs_load():
    for name in ("demo", "genimage_sdv14_vitb32"):
        cfg = load_config(f"ds_configs/{name}.yaml")
        assert cfg.name == name


def test_resolved_config_round_trips():
    cfg = build_config(parse_yaml(SEED_TRAINING), ["deepspeed.zero_stage=3"])
    again = build_config(parse_yaml(cfg.to_yaml()))
    assert again == cfg


def test_monitor_must_be_a_metric_and_mode_follows_its_name():
    assert "did you mean val_auc?" in error_of({"training": {"monitor": "val_acu"}})
    assert build_config({"training": {"monitor": "val_loss"}}).training.monitor_higher_is_better is False
    assert build_config({"training": {"monitor": "val_auc"}}).training.monitor_higher_is_better is True
    assert build_config({"training": {"monitor": "val_loss", "monitor_mode": "max"}}).training.monitor_higher_is_better


def test_offload_needs_zero():
    assert "offload_optimizer needs ZeRO" in error_of({"deepspeed": {"offload_optimizer": "cpu"}})
    assert (
        build_config({"deepspeed": {"offload_optimizer": "cpu", "zero_stage": 2}}).deepspeed.offload_optimizer == "cpu"
    )


@pytest.mark.parametrize(
    "model, needle",
    [
        ({"mode": "zero-shot", "lora": {"enabled": True}}, "lora applies to mode fine-tune"),
        ({"freeze_backbone": True, "lora": {"enabled": True}}, "contradict"),
        ({"mode": "prompt-tuning", "freeze_backbone": True}, "freeze_backbone applies to mode fine-tune"),
        ({"mode": "zero-shot", "num_classes": 3}, "num_classes must be 2"),
    ],
)
def test_strategy_contradictions_are_refused(model, needle):
    assert needle in error_of({"model": model})
