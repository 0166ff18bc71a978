"""The table of refusals: every bad input a user can give gets an exit code and a short message.

Each case runs the real CLI (`ds-trainer train|eval|report ...`, in this process) and checks the
documented exit code, a message of one to three lines that names the key or file, and no
traceback. `docs/errors.md` is generated from these runs: `make errors-doc` rewrites it, and
`test_errors_doc_is_current` fails when it no longer matches what the CLI prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_config

from ds_trainer import cli

DOC = REPO / "docs" / "errors.md"


@dataclass(frozen=True)
class Case:
    id: str
    cause: str  # what the user did, for docs/errors.md
    code: int
    pattern: str  # must be found in the message
    build: Callable[[Path, Path], list[str]]  # (tmp dir, shards) -> CLI argv


def config_with(tmp: Path, shards: Path, tree: dict | None = None, text: str | None = None, **sections) -> Path:
    """A valid small training config, changed by `sections`, or replaced by a raw `tree` / `text`."""
    cfg = write_config(tmp / "cfg.yaml", shards, **sections)
    if tree is not None:
        base = yaml.safe_load(cfg.read_text())
        for section, values in tree.items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section].update(values)
            else:
                base[section] = values
        cfg.write_text(yaml.safe_dump(base))
    if text is not None:
        cfg.write_text(text)
    return cfg


def train(tree: dict | None = None, text: str | None = None, extra: tuple[str, ...] = (), **sections):
    def build(tmp: Path, shards: Path) -> list[str]:
        return ["train", "--config", str(config_with(tmp, shards, tree, text, **sections)), *extra]

    return build


def ds_json(content: str, **sections):
    def build(tmp: Path, shards: Path) -> list[str]:
        (tmp / "ds.json").write_text(content)
        rest = dict(sections)
        deepspeed = {**rest.pop("deepspeed", {}), "config_file": str(tmp / "ds.json")}
        return train(deepspeed=deepspeed, **rest)(tmp, shards)

    return build


def empty_manifest(tmp: Path, shards: Path) -> list[str]:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest.update(shards=[], counts={})
    (tmp / "empty").mkdir()
    (tmp / "empty" / "manifest.json").write_text(json.dumps(manifest))
    return train(data={"shards": str(tmp / "empty")})(tmp, shards)


def not_a_manifest(tmp: Path, shards: Path) -> list[str]:
    (tmp / "other").mkdir()
    (tmp / "other" / "manifest.json").write_text(json.dumps({"files": []}))
    return train(data={"shards": str(tmp / "other")})(tmp, shards)


def load_dir_without_checkpoint(tmp: Path, shards: Path) -> list[str]:
    (tmp / "ckpt_empty").mkdir()
    return train(extra=("--load-dir", str(tmp / "ckpt_empty")))(tmp, shards)


def saved_checkpoint(tmp: Path, shards: Path, **state) -> Path:
    """A real one-rank checkpoint of the tiny CLIP (shared by the cases that need one), its state edited."""
    src = saved_checkpoint.cache  # type: ignore[attr-defined]
    dst = tmp / "saved"
    shutil.copytree(src, dst)
    marker = dst / "epoch_1" / "ds_trainer.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), **state}))
    return dst


def other_architecture(tmp: Path, shards: Path) -> list[str]:
    ckpt = saved_checkpoint(tmp, shards)
    return train(model={"lora": {"enabled": True}}, extra=("--load-dir", str(ckpt)))(tmp, shards)


def indivisible_world(tmp: Path, shards: Path) -> list[str]:
    # Saved by 3 ranks x batch 8 (global 24); here 1 rank of batch 16 would need 1.5 accumulation steps.
    ckpt = saved_checkpoint(tmp, shards, world_size=3, train_batch_size=24, micro_batch_size=8)
    return train(training={"batch_size": 16}, extra=("--load-dir", str(ckpt)))(tmp, shards)


def predict_on_a_checkpoint(tmp: Path, shards: Path) -> list[str]:
    ckpt = saved_checkpoint(tmp, shards)
    return ["predict", "--model", str(ckpt / "epoch_1"), str(tmp / "img.png")]


def eval_without_val(tmp: Path, shards: Path) -> list[str]:
    cfg = config_with(tmp, shards, data={"val_split": None})
    return ["eval", "--config", str(cfg), "--load-dir", str(tmp / "ckpt")]


CASES = [
    # --- the YAML file itself
    Case(
        "yaml-syntax",
        "YAML syntax error (a line indented wrongly)",
        2,
        r"cfg\.yaml: line 4",
        train(text="name: x\ntraining:\n    learning_rate: 0.001\n  batch_size: 8\n"),
    ),
    Case("yaml-not-mapping", "the YAML is a list, not a mapping", 2, r"mapping", train(text="- a\n- b\n")),
    Case(
        "yaml-python-tag",
        "a YAML tag that would run Python code",
        2,
        r"cfg\.yaml: line 1",
        train(text="name: !!python/object/apply:os.system ['touch pwned']\n"),
    ),
    Case(
        "config-missing",
        "--config names no file",
        2,
        r"no-such\.yaml",
        lambda tmp, shards: ["train", "--config", str(tmp / "no-such.yaml")],
    ),
    # --- unknown keys, at every level
    Case(
        "unknown-section",
        "an unknown top-level key",
        2,
        r"unknown key trainig — did you mean training\?",
        train(tree={"trainig": {}}),
    ),
    Case(
        "unknown-key",
        "an unknown key in a section",
        2,
        r"unknown key training\.learning_rat",
        train(tree={"training": {"learning_rat": 1e-3}}),
    ),
    Case(
        "unknown-nested-key",
        "an unknown key in a nested section",
        2,
        r"logging\.wandb\.projekt",
        train(logging={"wandb": {"projekt": "x"}}),
    ),
    Case(
        "unknown-lora-key",
        "an unknown key under model.lora",
        2,
        r"model\.lora\.rank",
        train(model={"lora": {"rank": 8}}),
    ),
    Case(
        "set-unknown-key",
        "--set of a key that does not exist",
        2,
        r"training\.lr",
        train(extra=("--set", "training.lr=1")),
    ),
    Case("set-syntax", "--set without KEY=VALUE", 2, r"KEY=VALUE", train(extra=("--set", "training.learning_rate"))),
    # --- types and ranges
    Case(
        "lr-type",
        "learning_rate is not a number",
        2,
        r"training\.learning_rate.*'fast'",
        train(training={"learning_rate": "fast"}),
    ),
    Case("lr-zero", "learning_rate 0", 2, r"training\.learning_rate", train(training={"learning_rate": 0})),
    Case(
        "lr-negative", "learning_rate below 0", 2, r"training\.learning_rate", train(training={"learning_rate": -1e-3})
    ),
    Case("batch-zero", "batch_size 0", 2, r"training\.batch_size", train(training={"batch_size": 0})),
    Case(
        "batch-float",
        "batch_size not an integer",
        2,
        r"training\.batch_size.*8\.5",
        train(training={"batch_size": 8.5}),
    ),
    Case("epochs-zero", "num_epochs 0", 2, r"training\.num_epochs", train(training={"num_epochs": 0})),
    Case(
        "accumulation-zero",
        "grad_accumulation_steps 0",
        2,
        r"training\.grad_accumulation_steps",
        train(training={"grad_accumulation_steps": 0}),
    ),
    Case(
        "warmup-too-long",
        "warmup longer than training",
        2,
        r"warmup_epochs",
        train(training={"num_epochs": 2, "warmup_epochs": 3}),
    ),
    Case(
        "min-lr-above-lr",
        "min_lr above learning_rate",
        2,
        r"min_lr.*learning_rate",
        train(training={"learning_rate": 1e-4, "min_lr": 1e-3}),
    ),
    Case(
        "optimizer",
        "an optimizer that does not exist",
        2,
        r"training\.optimizer",
        train(training={"optimizer": "lamb"}),
    ),
    Case(
        "scheduler",
        "a scheduler that does not exist",
        2,
        r"training\.scheduler",
        train(training={"scheduler": "linear"}),
    ),
    Case("momentum", "momentum outside [0, 1)", 2, r"training\.momentum", train(training={"momentum": 1.5})),
    Case(
        "monitor",
        "monitor is not a metric",
        2,
        r"training: monitor 'val_f1' is not a metric",
        train(training={"monitor": "val_f1"}),
    ),
    Case("workers", "num_workers below 0", 2, r"data\.num_workers", train(data={"num_workers": -1})),
    Case("zero-stage-4", "ZeRO stage 4", 2, r"deepspeed\.zero_stage", train(deepspeed={"zero_stage": 4})),
    Case(
        "precision",
        "a precision that does not exist",
        2,
        r"deepspeed\.precision",
        train(deepspeed={"precision": "fp8"}),
    ),
    Case(
        "offload-without-zero",
        "optimizer offload at ZeRO 0",
        2,
        r"offload_optimizer needs ZeRO",
        train(deepspeed={"zero_stage": 0, "offload_optimizer": "cpu"}),
    ),
    Case(
        "lora-zero-shot",
        "LoRA on a zero-shot model",
        2,
        r"lora applies to mode fine-tune",
        train(model={"mode": "zero-shot", "lora": {"enabled": True}}),
    ),
    Case(
        "checkpointing-frozen",
        "gradient checkpointing of a frozen backbone",
        2,
        r"gradient_checkpointing saves activation memory of a trained backbone; freeze_backbone",
        train(model={"freeze_backbone": True, "gradient_checkpointing": True}),
    ),
    Case(
        "attention-kernel",
        "an attention kernel that does not exist",
        2,
        r"model\.attn_implementation",
        train(model={"attn_implementation": "flash"}),
    ),
    # --- the raw DeepSpeed JSON
    Case(
        "ds-json-missing",
        "deepspeed.config_file names no file",
        2,
        r"deepspeed\.config_file: .*not found",
        lambda tmp, shards: train(deepspeed={"config_file": str(tmp / "none.json")})(tmp, shards),
    ),
    Case("ds-json-invalid", "deepspeed.config_file is not JSON", 2, r"line 1: invalid JSON", ds_json("{oops")),
    Case(
        "ds-json-contradicts",
        "the DeepSpeed JSON contradicts the YAML",
        2,
        r"disagrees with the YAML[\s\S]*zero_optimization\.stage",
        ds_json(json.dumps({"zero_optimization": {"stage": 3}}), deepspeed={"zero_stage": 1}),
    ),
    # --- what only the run can tell
    Case(
        "fp16-on-cpu",
        "fp16 on a CPU",
        2,
        r"fp16 is not supported by DeepSpeed on CPU",
        train(deepspeed={"precision": "fp16"}),
    ),
    Case(
        "plateau-without-val",
        "a plateau scheduler with no validation set",
        2,
        r"training\.monitor is val_auc \(the plateau scheduler follows it\), but there is no validation set",
        train(training={"scheduler": "plateau"}, data={"val_split": None}),
    ),
    Case(
        "model-name",
        "model_name is neither a hub id nor a directory",
        2,
        r"model\.model_name",
        train(model={"model_name": "no-such-org/no-such-model"}),
    ),
    Case(
        "shards-missing",
        "a missing shard directory",
        3,
        r"no-such-shards",
        lambda tmp, shards: train(data={"shards": str(tmp / "no-such-shards")})(tmp, shards),
    ),
    Case(
        "manifest-empty",
        "a shard manifest that lists no shards",
        3,
        r"empty/manifest\.json lists no shards",
        empty_manifest,
    ),
    Case(
        "manifest-foreign",
        "a manifest.json that ds-trainer shard did not write",
        3,
        r"not a ds_trainer shard manifest",
        not_a_manifest,
    ),
    Case(
        "load-dir-missing",
        "--load-dir names no directory",
        4,
        r"does not exist",
        lambda tmp, shards: train(extra=("--load-dir", str(tmp / "nothing")))(tmp, shards),
    ),
    Case("load-dir-empty", "--load-dir holds no checkpoint", 4, r"ckpt_empty", load_dir_without_checkpoint),
    Case(
        "other-architecture",
        "a checkpoint of another model",
        4,
        r"holds a model of [\d,]+ parameters",
        other_architecture,
    ),
    Case(
        "indivisible-world",
        "a world size that cannot keep the global batch",
        2,
        r"global batch of 24 .* not a whole number",
        indivisible_world,
    ),
    Case("eval-without-val", "ds-trainer eval with data.val_split null", 2, r"data\.val_split", eval_without_val),
    Case(
        "predict-on-checkpoint",
        "ds-trainer predict --model names a checkpoint, not an export",
        4,
        r"export it first: ds-trainer export --load-dir \S+/saved/epoch_1 --out \S+/exported/epoch_1",
        predict_on_a_checkpoint,
    ),
    Case(
        "report-eval-missing",
        "ds-trainer report --eval names no file",
        2,
        r"no such file",
        lambda tmp, shards: ["report", "--eval", str(tmp / "none.json"), "--out", str(tmp / "rep")],
    ),
    Case(
        "eval-bootstrap-negative",
        "ds-trainer eval --bootstrap with a negative number of resamples",
        2,
        r"--bootstrap -5: give a number of resamples from 0",
        lambda tmp, shards: ["eval", "--load-dir", str(tmp / "ckpt"), "--bootstrap", "-5"],
    ),
    Case(
        "eval-bootstrap-absurd",
        "ds-trainer eval --bootstrap with more resamples than intervals need",
        2,
        r"--bootstrap 10000000: .* to 100,000",
        lambda tmp, shards: ["eval", "--load-dir", str(tmp / "ckpt"), "--bootstrap", "10000000"],
    ),
]

RESULTS: dict[str, tuple[int, str]] = {}


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    text = err.getvalue()
    # Only the CLI's own message: library warnings (DeepSpeed's, torch's) may precede it.
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ds-trainer ")), len(lines))
    return code, "\n".join(lines[start:])


@pytest.fixture(scope="module")
def checkpoint_cache(tmp_path_factory, tiny_shards):
    """One epoch of the tiny CLIP in this process, saved as epoch_1."""
    out = tmp_path_factory.mktemp("refusal-ckpt")
    cfg = write_config(out / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0})
    assert cli.main(["train", "--config", str(cfg)]) == 0
    saved_checkpoint.cache = out / "ckpt"  # type: ignore[attr-defined]
    return out / "ckpt"


def run_case(case: Case, tmp: Path, shards: Path) -> tuple[int, str]:
    code, message = run_cli(case.build(tmp, shards))
    RESULTS[case.id] = (code, message.replace(str(tmp), "<dir>").replace(str(shards), "<shards>"))
    return code, message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refusal(case, tmp_path, tiny_shards, checkpoint_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, message = run_case(case, tmp_path, tiny_shards)
    assert code == case.code, message
    assert re.search(case.pattern, message), message
    assert "Traceback" not in message
    assert 1 <= len(message.splitlines()) <= 3, message


@pytest.mark.unit
def test_there_are_at_least_30_distinct_refusals():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


def render_doc(results: dict[str, tuple[int, str]]) -> str:
    from ds_trainer.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        DsTrainerError,
        PeerLostError,
        Preempted,
        TrainingError,
    )

    codes = [
        (0, "success", ""),
        *(
            (cls.exit_code, cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
            for cls in (
                DsTrainerError,
                ConfigError,
                DataError,
                CheckpointError,
                TrainingError,
                PeerLostError,
                Preempted,
            )
        ),
    ]
    out = [
        "# Exit codes and refusals",
        "",
        "Generated by `make errors-doc` from `tests/test_refusals.py`, which runs each case through the",
        "real CLI; `make test` fails when this page and the CLI disagree. `--debug` adds the traceback.",
        "",
        "| exit code | error | meaning |",
        "|---|---|---|",
        *(f"| {code} | {name} | {meaning} |" for code, name, meaning in codes),
        "| 130 | – | interrupted (Ctrl-C) |",
        "",
        "## Every refusal",
        "",
        "`<dir>` is the directory the command ran from; each message names the key or file and what to do.",
        "",
    ]
    for case in CASES:
        code, message = results[case.id]
        out += [f"### {case.cause} (`{case.id}`)", "", f"exit code {code}", "", "```text", message, "```", ""]
    return "\n".join(out)


def test_errors_doc_is_current(tmp_path_factory, tiny_shards, checkpoint_cache):
    for case in CASES:
        if case.id not in RESULTS:  # run on its own (-k doc): run the cases here
            tmp = tmp_path_factory.mktemp(case.id)
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                run_case(case, tmp, tiny_shards)
            finally:
                os.chdir(cwd)
    text = render_doc(RESULTS)
    if os.environ.get("DS_TRAINER_WRITE_ERRORS_DOC") == "1":
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, "docs/errors.md is out of date: run `make errors-doc`"
