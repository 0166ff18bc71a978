"""Layer 1: a config cannot cost more than it is worth, say less than it means, or echo a secret.

Alias bombs, repeated keys and sections, empty files, non-finite numbers, integers beyond what
their consumers accept, huge strings: each is refused with a short message naming the key.
"""

from __future__ import annotations

import time
import typing

import annotated_types
import pytest
from pydantic import BaseModel

from ds_trainer.config import Config, build_config, load_config, parse_yaml
from ds_trainer.config_yaml import MAX_ALIASES, MAX_CONFIG_BYTES, MAX_VALUES, cut, echo
from ds_trainer.errors import ConfigError

pytestmark = pytest.mark.unit

MESSAGE_LIMIT = 400  # no refusal here may print more than this


def refusal(text: str | None = None, overrides: tuple[str, ...] = (), tree: dict | None = None) -> str:
    start = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        build_config(parse_yaml(text, "cfg.yaml") if text is not None else tree, overrides, source="cfg.yaml")
    assert time.monotonic() - start < 3, "a refusal must be quick"
    message = str(exc.value)
    assert len(message) < MESSAGE_LIMIT, message
    return message


def laughs(levels: int, width: int) -> str:
    """`levels` anchors, each a list of `width` aliases of the previous one: width**levels values."""
    text = f"l0: &l0 [{', '.join(['lol'] * width)}]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]\n"
    return text


# ------------------------------------------------------------------ aliases, depth, size


@pytest.mark.parametrize("levels, width", [(9, 9), (12, 10), (40, 2)])
def test_alias_bombs_with_many_aliases_are_refused_at_the_alias_bound(levels, width):
    text = laughs(levels, width)
    assert len(text) < 1500
    assert f"more than {MAX_ALIASES} aliases" in refusal(text)


@pytest.mark.parametrize("levels, width, why", [(8, 4, "holds more than 10,000 values"), (16, 2, "once aliases")])
def test_alias_bombs_within_the_alias_bound_are_refused_by_their_expansion(levels, width, why):
    text = laughs(levels, width) + f"name: *l{levels - 1}\n"
    assert (levels - 1) * width <= MAX_ALIASES and width**levels > MAX_VALUES
    message = refusal(text)
    assert why in message and "once aliases are followed" in message


def test_a_few_aliases_are_fine():
    tree = parse_yaml("gens: &g [adm, glide]\ndata:\n  train_generators: *g\n  eval_generators: *g\n")
    assert tree["data"]["train_generators"] == ["adm", "glide"]


def test_deep_nesting_is_refused_before_recursion():
    assert "nested deeper than 16 levels" in refusal("[" * 20_000 + "]" * 20_000)


def test_a_file_over_the_size_bound_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: " + "x" * 1_000_000 + "\n")  # a 1 MB run name
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"is 1,000,007 bytes; a config is at most {MAX_CONFIG_BYTES:,}"):
        load_config(path)
    assert time.monotonic() - start < 1


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


# ------------------------------------------------------------------ empty files, repeated keys


@pytest.mark.parametrize("text", ["", "\n\n", "   \n\t\n", "# only a comment\n", "---\n", "--- # nothing\n...\n"])
def test_an_empty_or_blank_file_is_refused_not_taken_for_all_defaults(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is empty .* every default"):
        load_config(path)


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            "training:\n  batch_size: 8\n  batch_size: 16\n",
            "line 3, column 3: key 'batch_size' appears twice (first at line 2)",
        ),
        ("name: a\nseed: 1\nname: b\n", "line 3, column 1: key 'name' appears twice (first at line 1)"),
        ("training: {}\nmodel: {}\ntraining:\n  num_epochs: 2\n", "section 'training' appears twice (first at line 1)"),
        ("logging:\n  wandb:\n    project: a\n    project: b\n", "key 'project' appears twice"),
        ("data: {num_workers: 1, num_workers: 2}\n", "key 'num_workers' appears twice"),
    ],
)
def test_a_repeated_key_or_section_is_refused_naming_both_lines(text, needle):
    assert needle in refusal(text)


def test_a_merge_key_may_be_overridden_as_yaml_means():
    text = "base: &b {batch_size: 8, num_epochs: 2}\ntraining:\n  <<: *b\n  batch_size: 16\n"
    assert parse_yaml(text)["training"] == {"batch_size": 16, "num_epochs": 2}


# ------------------------------------------------------------------ numbers


NON_FINITE_KEYS = [
    "training.learning_rate", "training.weight_decay", "training.clip_grad_norm", "training.min_delta",
    "model.lora.alpha", "data.max_bad_fraction", "data.jpeg_prob", "logging.peak_tflops", "distributed.timeout_s",
]  # fmt: skip


@pytest.mark.parametrize("key", NON_FINITE_KEYS)
@pytest.mark.parametrize("literal", [".inf", "-.inf", ".nan", ".NaN", "+.INF"])
def test_non_finite_numbers_are_refused_in_the_file_and_in_set(key, literal):
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {literal}\n"
    assert f"{key}: Input should be a finite number" in refusal(text)
    assert f"{key}: Input should be a finite number" in refusal(overrides=(f"{key}={literal}",), tree={})


@pytest.mark.parametrize(
    "override, needle",
    [
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("seed=4294967296", "seed: Input should be less than or equal to 4294967295"),
        ("seed=1e300", "seed:"),
        ("distributed.timeout_s=1e300", "distributed.timeout_s: Input should be less than or equal to 604800"),
        ("distributed.timeout_s=0.001", "distributed.timeout_s: Input should be greater than or equal to 1"),
        ("training.batch_size=1000000000", "training.batch_size: Input should be less than or equal to 65536"),
        ("training.num_epochs=10**9", "training.num_epochs"),
        ("training.num_epochs=1000000000", "training.num_epochs: Input should be less than or equal to 100000"),
        ("training.learning_rate=1e300", "training.learning_rate: Input should be less than or equal to 10"),
        ("data.shuffle_buffer=1000000000", "data.shuffle_buffer"),
        ("data.blur_sigma=[0, 1e9]", "blur_sigma must stay at most 100 px"),
        ("logging.log_every_n_steps=1e12", "logging.log_every_n_steps"),
    ],
)
def test_integers_and_floats_are_bounded_by_what_their_consumers_accept(override, needle):
    assert needle in refusal(overrides=(override,), tree={})


def test_the_edges_of_the_bounds_are_accepted():
    cfg = build_config({}, ["seed=4294967295", "distributed.timeout_s=604800", "training.batch_size=65536"])
    assert (cfg.seed, cfg.distributed.timeout_s, cfg.training.batch_size) == (2**32 - 1, 604800, 65536)
    import numpy as np

    np.random.seed(cfg.seed)  # the consumer takes the largest seed the config admits


def _bounded(field) -> bool:
    return any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in field.metadata)


# Bounded by a validator instead of a constant: warmup_epochs < num_epochs, min_lr <= learning_rate,
# the (low, high) pairs checked in DataSection._check_ranges.
BOUNDED_BY_VALIDATOR = {
    "training.warmup_epochs",
    "training.min_lr",
    "data.blur_sigma",
    "data.jpeg_quality",
    "data.threshold",
}


def test_every_numeric_key_has_an_upper_bound():
    unbounded = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            dotted = f"{prefix}{name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, dotted + ".")
                continue
            args = set(typing.get_args(ann)) | {ann}
            numeric = bool(args & {int, float}) or any(set(typing.get_args(a)) & {int, float} for a in args)
            if numeric and ann is not bool and not _bounded(field) and dotted not in BOUNDED_BY_VALIDATOR:
                unbounded.append(dotted)

    walk(Config, "")
    assert unbounded == []


# ------------------------------------------------------------------ strings and echoes


def test_a_huge_run_name_is_refused_with_a_short_message(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: " + "n" * 200_000 + "\n")  # within the file bound: the string bound refuses it
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "name: String should have at most 128 characters" in str(exc.value)
    assert len(str(exc.value)) < MESSAGE_LIMIT
    assert "1 MB" not in refusal(overrides=("name=" + "n" * 1_000_000,), tree={})  # --set: the same size bound


@pytest.mark.parametrize(
    "tree",
    [
        {"name": ["x" * 1000] * 5000},  # a list where a string belongs
        {"training": {"learning_rate": "fast" * 50_000}},
        {"model": {"mode": "m" * 4000}},
        {"logging": {"wandb": {"tags": ["t" * 10_000]}}},
        {"training": {"monitor": "val_" * 10_000}},
    ],
)
def test_echoed_values_are_cut_to_a_short_prefix(tree):
    message = refusal(tree=tree)
    assert all(len(line) <= 300 for line in message.splitlines()), message


def test_a_value_under_a_secret_looking_key_is_never_echoed():
    secret = "hf_abcdefghijklmnopqrstuvwxyz0123456789"
    for loc in (["logging", "wandb", "api_key"], ["hf_token"], ["db", "password"], ["aws_secret_access_key"]):
        assert secret[:8] not in echo(secret, loc)
    assert echo("adamw", ["training", "optimizer"]) == "'adamw'"
    # --set without '=': it may be a token pasted in the wrong place, so it is not shown
    assert secret[:8] not in refusal(overrides=(secret,), tree={})
    assert "'training.batch_size'" in refusal(overrides=("training.batch_size",), tree={})


def test_cut_says_how_long_the_original_was():
    assert cut("short") == "short"
    assert cut("x" * 1000, 60).endswith("… (1,000 chars)") and len(cut("x" * 1000, 60)) < 60


def test_a_valid_config_still_loads_with_every_bound_in_place():
    cfg = load_config("ds_configs/demo.yaml", ["training.learning_rate=3e-5", "name=demo-run"])
    assert cfg.training.learning_rate == 3e-5 and cfg.name == "demo-run"
