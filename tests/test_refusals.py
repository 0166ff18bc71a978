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

from ds_trainer import cli, integrity

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
    marker.write_text(integrity.seal({**json.loads(marker.read_text()), **state}))  # sealed again: an edit, not damage
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


def eval_with(*flags: str) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, shards: Path) -> list[str]:
        return ["eval", "--load-dir", str(tmp / "ckpt"), *flags]

    return build


def appended(extra: str):
    """The valid config with `extra` YAML appended: its last section is training, so indented lines go there."""

    def build(tmp: Path, shards: Path) -> list[str]:
        cfg = config_with(tmp, shards)
        cfg.write_text(cfg.read_text() + extra)
        return ["train", "--config", str(cfg)]

    return build


def hostile_manifest(edit: Callable[[Path, dict], None]):
    """A copy of the shard set whose manifest `edit(root, manifest)` changed, trained on."""

    def build(tmp: Path, shards: Path) -> list[str]:
        root = tmp / "hostile" / "shards"
        shutil.copytree(shards, root)
        manifest = json.loads((root / "manifest.json").read_text())
        edit(root, manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
        return train(data={"shards": str(root)})(tmp, shards)

    return build


def a_file_at(key: str, below: bool = False):
    """training.checkpoint_dir / logging.run_dir named where a regular file is (or below one)."""

    def build(tmp: Path, shards: Path) -> list[str]:
        (tmp / "plain").write_text("not a directory\n")
        target = tmp / "plain" / "sub" if below else tmp / "plain"
        return train(extra=("--set", f"{key}={target}"))(tmp, shards)

    return build


def locked(key: str, content: str):
    """`key`'s directory holds a lock file with `content` (a run on another host that refreshed it just now)."""

    def build(tmp: Path, shards: Path) -> list[str]:
        argv = train()(tmp, shards)
        cfg = yaml.safe_load(Path(argv[2]).read_text())
        section, name = key.split(".")
        directory = Path(cfg[section][name])
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".ds_trainer.lock").write_text(content)
        return argv

    return build


LIVE_ELSEWHERE = json.dumps({"host": "gpu-node-7", "pid": 4242, "started": "2025-06-01T09:00:00+0000"})


def marker(content: str, command: str):
    """The saved checkpoint's ds_trainer.json replaced by `content`, then `command` run on it."""

    def build(tmp: Path, shards: Path) -> list[str]:
        ckpt = saved_checkpoint(tmp, shards)
        (ckpt / "epoch_1" / "ds_trainer.json").write_text(content)
        if command == "export":
            return ["export", "--load-dir", str(ckpt), "--tag", "epoch_1", "--out", str(tmp / "exported")]
        if command == "eval":
            return ["eval", "--load-dir", str(ckpt), "--tag", "epoch_1"]
        return train(extra=("--load-dir", str(ckpt / "epoch_1")))(tmp, shards)

    return build


def image_tree(tmp: Path, rel: str) -> Path:
    """A folder `tmp/src` with one PNG at `rel`/x.png."""
    from PIL import Image

    (tmp / "src" / rel).mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp / "src" / rel / "x.png")
    return tmp / "src"


def shard_argv(tmp: Path, layout: str, src: Path) -> list[str]:
    return [
        "shard",
        "--layout",
        layout,
        "--src",
        str(src),
        "--out",
        str(tmp / "out"),
        "--workers",
        "1",
        "--no-progress",
    ]


def list_argv(text: str, name: str = "list.csv") -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, shards: Path) -> list[str]:
        src = image_tree(tmp, ".")
        (src / name).write_text(text)
        return shard_argv(tmp, "list", src / name)

    return build


def _outside(root: Path, manifest: dict) -> None:
    (root.parent / "outside").mkdir()
    shutil.copy(root / manifest["shards"][0]["path"], root.parent / "outside" / "x.tar")
    manifest["shards"][0]["path"] = "../outside/x.tar"


def _absolute(root: Path, manifest: dict) -> None:
    manifest["shards"][0]["path"] = str(root / manifest["shards"][0]["path"])


def _entry(**change):
    return lambda root, manifest: manifest["shards"][0].update(change)


def _twice(root: Path, manifest: dict) -> None:
    manifest["shards"].append(dict(manifest["shards"][0], path="./" + manifest["shards"][0]["path"]))


def _disagrees(root: Path, manifest: dict) -> None:
    entry = manifest["shards"][0]
    entry.update(count=entry["count"] - 1, nature=entry["nature"] - 1)


# --- checkpoint integrity and tags (issue 18, families 2 and 3)
def flipped_checkpoint_file(tmp: Path, shards: Path) -> list[str]:
    ckpt = saved_checkpoint(tmp, shards)
    model = ckpt / "epoch_1" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    return ["export", "--load-dir", str(ckpt), "--out", str(tmp / "exported")]


def edited_marker(tmp: Path, shards: Path) -> list[str]:
    ckpt = saved_checkpoint(tmp, shards)
    marker = ckpt / "epoch_1" / "ds_trainer.json"
    marker.write_text(marker.read_text().replace('"epoch": 1', '"epoch": 7'))  # no longer what was sealed
    return ["eval", "--load-dir", str(ckpt), "--out", str(tmp / "eval.json")]


def latest_outside(tmp: Path, shards: Path) -> list[str]:
    ckpt = saved_checkpoint(tmp, shards)
    (ckpt / "latest").write_text("/srv/other_run/ckpt/epoch_1")  # short: the message cuts a long one
    return train(extra=("--load-dir", str(ckpt)))(tmp, shards)


def tag_path(tmp: Path, shards: Path) -> list[str]:
    ckpt = saved_checkpoint(tmp, shards)
    return ["export", "--load-dir", str(ckpt), "--tag", "../other/epoch_1", "--out", str(tmp / "exported")]


def tag_symlink_outside(tmp: Path, shards: Path) -> list[str]:
    ckpt = saved_checkpoint(tmp, shards)
    (tmp / "elsewhere").mkdir()
    (ckpt / "linked").symlink_to(tmp / "elsewhere", target_is_directory=True)
    return ["export", "--load-dir", str(ckpt), "--tag", "linked", "--out", str(tmp / "exported")]


def prepared_set(tmp: Path, shards: Path, *flags: str) -> Path:
    """`ds-trainer prepare` of the tiny shards with `flags`, into <tmp>/prepared."""
    out = tmp / "prepared"
    assert cli.main(["prepare", str(shards), str(out), "--workers", "1", "--no-progress", *flags]) == 0
    return out


def train_prepared(flags: tuple[str, ...], **data):
    def build(tmp: Path, shards: Path) -> list[str]:
        return train(data={"shards": str(prepared_set(tmp, shards, *flags)), **data})(tmp, shards)

    return build


def eval_prepared(flags: tuple[str, ...], *track: str):
    def build(tmp: Path, shards: Path) -> list[str]:
        out = prepared_set(tmp, shards, *flags)
        return ["eval", "--load-dir", str(saved_checkpoint(tmp, shards)), "--shards", str(out), *track]

    return build


def short_source(tmp: Path, shards: Path) -> list[str]:
    shutil.copytree(shards, tmp / "src")
    tar = sorted((tmp / "src").glob("*/train/shard-*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    return ["prepare", str(tmp / "src"), str(tmp / "out"), "--align-jpeg", "96", "--workers", "1", "--no-progress"]


# A "billion laughs": 9 aliases on each of 9 levels (81 in all) in ~750 bytes; and 4 on each of 8 levels
# (32, within the alias bound) that would expand to 4**8 values.
ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)
WIDE_ALIASES = "a0: &a0 [x, x, x, x]\n" + "".join(
    f"a{i + 1}: &a{i + 1} [*a{i}, *a{i}, *a{i}, *a{i}]\n" for i in range(7)
)


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
    # --- ds-trainer eval's robustness and debiased tracks: refused before anything loads
    Case("eval-perturb-unknown-kind", "ds-trainer eval --perturb names an unknown kind", 2,
         r"--perturb 'sharpen:1': unknown kind 'sharpen'", eval_with("--perturb", "sharpen:1")),
    Case("eval-perturb-jpeg-quality", "ds-trainer eval --perturb with a JPEG quality outside 1..100", 2,
         r"--perturb 'jpeg:75,101': level '101' .* 1 to 100", eval_with("--perturb", "jpeg:75,101")),
    Case("eval-perturb-negative-sigma", "ds-trainer eval --perturb with a negative blur sigma", 2,
         r"level '-1' .* sigma .* >= 0", eval_with("--perturb", "blur:-1")),
    Case("eval-perturb-small-resize", "ds-trainer eval --perturb resizes below 8 px", 2,
         r"level '4' .* >= 8", eval_with("--perturb", "resize:4")),
    Case("eval-perturb-no-levels", "ds-trainer eval --perturb with an empty list of levels", 2,
         r"--perturb 'jpeg:': give jpeg at least one level", eval_with("--perturb", "jpeg:")),
    Case("eval-align-jpeg-quality", "ds-trainer eval --align-jpeg with a quality outside 1..100", 2,
         r"--align-jpeg 0: .* 1 to 100", eval_with("--align-jpeg", "0")),
    Case("eval-align-classes-alone", "ds-trainer eval --align-classes without --align-jpeg", 2,
         r"give --align-jpeg Q too", eval_with("--align-classes", "fakes")),
    # --- the run's directories: in use, or not usable (checked before the set-up, nothing written)
    Case(
        "checkpoint-dir-in-use",
        "training.checkpoint_dir is held by a live run (on this host or another)",
        4,
        r"training\.checkpoint_dir \S+ is in use by a live run \(host gpu-node-7, PID 4242",
        locked("training.checkpoint_dir", LIVE_ELSEWHERE),
    ),
    Case(
        "run-dir-in-use",
        "logging.run_dir is held by a live run (with another checkpoint_dir)",
        4,
        r"logging\.run_dir \S+ is in use by a live run",
        locked("logging.run_dir", LIVE_ELSEWHERE),
    ),
    Case(
        "lock-not-a-record",
        "a lock file that is JSON but no lock record (a PID that is no number, a list)",
        4,
        r"\.ds_trainer\.lock is not a ds_trainer lock \(it holds \{\"pid\": \"abc\"\}",
        locked("training.checkpoint_dir", '{"pid": "abc"}'),
    ),
    Case(
        "lock-a-list",
        "a lock file holding a JSON list",
        4,
        r"\.ds_trainer\.lock is not a ds_trainer lock \(it holds \[\]",
        locked("logging.run_dir", "[]"),
    ),
    Case(
        "checkpoint-dir-is-file",
        "training.checkpoint_dir names a regular file",
        2,
        r"training\.checkpoint_dir \S+/plain is a file, not a directory",
        a_file_at("training.checkpoint_dir"),
    ),
    Case(
        "run-dir-is-file",
        "logging.run_dir names a regular file",
        2,
        r"logging\.run_dir \S+/plain is a file, not a directory",
        a_file_at("logging.run_dir"),
    ),
    Case(
        "run-dir-below-file",
        "logging.run_dir lies below a regular file",
        2,
        r"logging\.run_dir \S+/plain/sub cannot be made: \S+/plain is a file",
        a_file_at("logging.run_dir", below=True),
    ),
    # --- a checkpoint record that is no record
    Case(
        "marker-empty-object",
        "a checkpoint whose ds_trainer.json is {} (export)",
        4,
        r"epoch_1/ds_trainer\.json is not a ds_trainer checkpoint record",
        marker("{}", "export"),
    ),
    Case(
        "marker-list",
        "a checkpoint whose ds_trainer.json is [] (eval)",
        4,
        r"checkpoint 'epoch_1' in \S+ \(ds_trainer\.json is not a ds_trainer checkpoint record; complete tags: best\)",
        marker("[]", "eval"),
    ),
    Case(
        "marker-wrong-type",
        "a checkpoint record whose epoch is no number (train --load-dir)",
        4,
        r"ds_trainer\.json is not a ds_trainer checkpoint record \(epoch is \"1\", not a whole number\)",
        marker('{"epoch": "1", "global_step": 8}', "train"),
    ),
    # --- ds-trainer shard --layout, and eval over several shard sets
    Case("shard-layout-unknown", "ds-trainer shard --layout names no layout", 2,
         r"--layout folders: unknown layout; use one of genimage, binary-folders, list",
         lambda tmp, shards: shard_argv(tmp, "folders", image_tree(tmp, "a/train/ai"))),
    Case("shard-binary-no-class-folders", "ds-trainer shard --layout binary-folders on a tree without 0_real/1_fake",
         3, r"no 0_real/ or 1_fake/ folder in \S+src \(layout .*\); it contains: sd",
         lambda tmp, shards: shard_argv(tmp, "binary-folders", image_tree(tmp, "sd/train/ai"))),
    Case("shard-list-missing-file", "ds-trainer shard --layout list with a row naming no file", 3,
         r"list\.csv line 3: no file \S+gone\.png", list_argv("path,label,generator\nx.png,1,g\ngone.png,0,g\n")),
    Case("shard-list-bad-label", "ds-trainer shard --layout list with a label that is not 0/1, real/fake, nature/ai", 3,
         r"list\.jsonl line 1: label 'synthetic' is not one of",
         list_argv('{"path": "x.png", "label": "synthetic", "generator": "g"}\n', "list.jsonl")),
    Case("eval-shards-no-split", "ds-trainer eval --shards names a set without the split to score", 3,
         r"--shards \S+:test: shard set \S+ has no 'test' split \(it has: train, val\)",
         lambda tmp, shards: ["eval", "--load-dir", str(saved_checkpoint(tmp, shards)), "--shards", f"{shards}:test"]),
    Case("eval-shards-with-perturb", "ds-trainer eval with several --shards and --perturb", 2,
         r"score one shard set; give a single --shards",
         lambda tmp, shards: ["eval", "--load-dir", str(saved_checkpoint(tmp, shards)), "--shards", f"a={shards}",
                              "--shards", f"b={shards}", "--perturb", "jpeg:50"]),
    # --- hostile shard manifests (issue 18)
    Case(
        "manifest-path-outside",
        "a shard path in manifest.json that leads outside the shard folder",
        3,
        r"shards\[0\] path '\.\./outside/x\.tar' is a path that leads outside the shard folder",
        hostile_manifest(_outside),
    ),
    Case(
        "manifest-path-absolute",
        "an absolute shard path in manifest.json",
        3,
        r"shards\[0\] path '/\S+' is an absolute path",
        hostile_manifest(_absolute),
    ),
    Case(
        "manifest-count-negative",
        "a negative sample count in manifest.json",
        3,
        r"shards\[0\] \(\S+\): count -1 is not a whole number >= 0",
        hostile_manifest(_entry(count=-1)),
    ),
    Case(
        "manifest-count-impossible",
        "a sample count no shard of its size can hold",
        3,
        r"count 1000000000000 is more than",
        hostile_manifest(_entry(count=10**12, ai=10**12, nature=0)),
    ),
    Case(
        "manifest-count-sidecar",
        "a sample count that disagrees with the shard's sidecar",
        3,
        r"count \d+ disagrees with its sidecar shard-\d+\.json",
        hostile_manifest(_disagrees),
    ),
    Case(
        "manifest-shard-twice",
        "a shard listed twice in manifest.json",
        3,
        r"shards\[\d+\] \(\./\S+\) is the shard of shards\[0\] again",
        hostile_manifest(_twice),
    ),
    Case(
        "checkpoint-file-changed",
        "a checkpoint file changed after it was saved (one flipped byte)",
        4,
        r"epoch_1 is damaged: mp_rank_00_model_states\.pt does not match the sha256",
        flipped_checkpoint_file,
    ),
    Case(
        "checkpoint-marker-changed",
        "a checkpoint's ds_trainer.json edited or damaged after the save",
        4,
        r"epoch_1/ds_trainer\.json is damaged: its content does not match",
        edited_marker,
    ),
    Case(
        "tag-path",
        "--tag names a path, not a tag",
        4,
        r"--tag: tag '\.\./other/epoch_1' holds a path separator",
        tag_path,
    ),
    Case(
        "latest-outside",
        "a checkpoint's latest file names a path outside it",
        4,
        r"saved/latest: tag '/srv/other_run/ckpt/epoch_1' is an absolute path",
        latest_outside,
    ),
    Case(
        "tag-symlink-outside",
        "a tag directory is a symbolic link leading out of the checkpoint directory",
        4,
        r"saved/linked is a symbolic link to .*elsewhere, outside",
        tag_symlink_outside,
    ),
    # --- bounds on the YAML itself and on every value (issue 18, family 7)
    Case(
        "yaml-alias-bomb",
        "a YAML alias bomb (81 aliases in 750 bytes)",
        2,
        r"more than 32 aliases",
        train(text=ALIAS_BOMB),
    ),
    Case(
        "yaml-alias-expansion",
        "YAML aliases that would expand to 65,536 values",
        2,
        r"holds more than 10,000 values once aliases are followed",
        train(text=WIDE_ALIASES + "name: *a7\n"),
    ),
    Case(
        "yaml-duplicate-key",
        "a key given twice in one section",
        2,
        r"cfg\.yaml: line \d+, column 3: key 'batch_size' appears twice \(first at line \d+\)",
        appended("  batch_size: 16\n"),
    ),
    Case(
        "yaml-duplicate-section",
        "a section (training:) given twice",
        2,
        r"section 'training' appears twice",
        appended("training:\n  num_epochs: 2\n"),
    ),
    Case("config-empty", "an empty config file", 2, r"cfg\.yaml is empty", train(text="")),
    Case(
        "config-blank",
        "a config file of blank lines and comments",
        2,
        r"is empty",
        train(text="\n  \n# all defaults?\n"),
    ),
    Case(
        "config-too-large",
        "a config file over 256 KiB (a 1 MB run name)",
        2,
        r"cfg\.yaml is 1,000,006 bytes; a config is at most 262,144",
        train(text="name: " + "x" * 1_000_000),
    ),
    Case(
        "name-too-long",
        "a run name of 100,000 characters",
        2,
        r"name: String should have at most 128 characters \(got 'x+\.\.\.x+'\)$",
        train(tree={"name": "x" * 100_000}),
    ),
    Case(
        "lr-inf",
        "learning_rate .inf",
        2,
        r"training\.learning_rate: Input should be a finite number",
        train(training={"learning_rate": float("inf")}),
    ),
    Case(
        "min-lr-minus-inf",
        "min_lr -.inf",
        2,
        r"training\.min_lr: Input should be a finite number",
        train(training={"min_lr": float("-inf")}),
    ),
    Case(
        "gamma-nan",
        "a NaN (.nan) factor",
        2,
        r"training\.gamma: Input should be a finite number",
        train(training={"gamma": float("nan")}),
    ),
    Case(
        "blur-sigma-inf",
        "an infinite blur_sigma bound",
        2,
        r"data\.blur_sigma\.1: Input should be a finite number",
        train(data={"blur_sigma": [0.0, float("inf")]}),
    ),
    Case("seed-negative", "seed -1", 2, r"seed: Input should be greater than or equal to 0", train(tree={"seed": -1})),
    Case(
        "seed-too-large",
        "seed 2**32 (numpy's seeds end at 2**32 - 1)",
        2,
        r"seed: Input should be less than or equal to 4294967295",
        train(tree={"seed": 2**32}),
    ),
    Case(
        "timeout-huge",
        "distributed.timeout_s 1e300",
        2,
        r"distributed\.timeout_s: Input should be less than or equal to",
        train(distributed={"timeout_s": 1e300}),
    ),
    Case(
        "set-inf",
        "--set of .inf",
        2,
        r"training\.weight_decay: Input should be a finite number",
        train(extra=("--set", "training.weight_decay=.inf")),
    ),
    Case(
        "set-duplicate-key",
        "--set of a mapping with a repeated key",
        2,
        r"--set model\.lora: line 1, .*key 'r' appears twice",
        train(extra=("--set", "model.lora={r: 4, r: 8}")),
    ),
    # --- native multi-crop evaluation: K must be a supported placement, and only with crop native
    Case("config-eval-crops-unsupported", "data.eval_crops is not 1, 5 or 10", 2,
         r"data\.eval_crops: 3 crops is not a supported placement; use 1 \(centre\), 5", train(data={"eval_crops": 3})),
    Case("config-eval-crops-resize", "data.eval_crops above 1 with data.crop resize", 2,
         r"data: eval_crops 5 .* set crop: native", train(data={"eval_crops": 5})),
    Case("eval-crops-flag-unsupported", "ds-trainer eval --eval-crops with an unsupported count", 2,
         r"data\.eval_crops: 7 crops is not a supported placement",
         lambda tmp, shards: ["eval", "--load-dir", str(saved_checkpoint(tmp, shards)), "--eval-crops", "7"]),
    Case("eval-crops-flag-resize", "ds-trainer eval --eval-crops 10 on a checkpoint trained with crop resize", 2,
         r"data: eval_crops 10 .* set crop: native",
         lambda tmp, shards: ["eval", "--load-dir", str(saved_checkpoint(tmp, shards)), "--eval-crops", "10"]),
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
    Case("config-threshold-calibrated-without-holdout", "data.threshold calibrated with no holdout to fit it on", 2,
         r"threshold calibrated is fitted on held-out training data, never on the test set",
         train(data={"threshold": "calibrated"})),
    Case("config-threshold-out-of-range", "data.threshold outside (0, 1)", 2,
         r"threshold 1\.2 is a P\(AI\) cut", train(data={"threshold": 1.2})),
    Case("eval-threshold-unknown", "ds-trainer eval --threshold with an unknown mode", 2,
         r"--threshold best: use calibrated .* oracle .* a number in \(0, 1\)",
         lambda tmp, shards: ["eval", "--load-dir", str(tmp / "ckpt"), "--threshold", "best"]),
    Case("eval-threshold-calibrated-no-holdout", "ds-trainer eval --threshold calibrated on a run without a holdout", 2,
         r"holds no calibrated threshold: its run had no holdout",
         lambda tmp, shards: ["eval", "--load-dir", str(saved_checkpoint(tmp, shards)), "--threshold", "calibrated"]),
    Case("eval-threshold-calibration-malformed", "a checkpoint whose stored calibration is malformed", 4,
         r"calibration threshold 7\.0 is not within \[0, 1\]",
         lambda tmp, shards: ["eval", "--load-dir", str(saved_checkpoint(
             tmp, shards, calibration={"threshold": 7, "temperature": 1, "samples": 4, "fitted_on": "x"}))]),
    # --- ds-trainer prepare, and runs on a prepared set whose manifest contradicts their data: settings
    Case("prepare-nothing-to-do", "ds-trainer prepare with no step to do (--store jpeg alone)", 2,
         r"prepare: nothing to do; give --align-jpeg Q, --resize-shortest N or --store raw",
         lambda tmp, shards: ["prepare", str(shards), str(tmp / "out")]),
    Case("prepare-of-prepared", "ds-trainer prepare of a set that is itself prepared", 2,
         r"prepare: .*prepared is itself a prepared set \(from ",
         lambda tmp, shards: ["prepare", str(prepared_set(tmp, shards, "--align-jpeg", "96")), str(tmp / "out"),
                              "--store", "raw"]),
    Case("prepare-out-is-src", "ds-trainer prepare with OUT the same directory as SRC", 2,
         r"prepare: OUT .* and SRC .* overlap",
         lambda tmp, shards: ["prepare", str(shards), str(shards), "--align-jpeg", "96"]),
    Case("prepare-short-source", "ds-trainer prepare of a source shard that is truncated", 3,
         r"source shard .*: sample .* cannot be read .*re-create the source shards", short_source),
    Case("prepared-align-unset", "training on fakes prepared with --align-jpeg while data.align_jpeg_quality is unset", 2,
         r"data\.align_jpeg_quality is unset, but shard set .* was prepared \(fakes re-encoded as JPEG at quality 96",
         train_prepared(("--align-jpeg", "96"))),
    Case("prepared-align-differs", "data.align_jpeg_quality differs from the quality the set was prepared with", 2,
         r"data\.align_jpeg_quality is 90, but .*quality 96.*set data\.align_jpeg_quality: 96",
         train_prepared(("--align-jpeg", "96"), align_jpeg_quality=90)),
    Case("prepared-resize-image-size", "data.image_size differs from the set's --resize-shortest", 2,
         r"data\.crop is resize at data\.image_size 224, but .*resized to 256.*data\.image_size \(or data\.resize_shortest\): 256",
         train_prepared(("--resize-shortest", "256", "--store", "raw"))),
    Case("prepared-resize-augment", "Blur/JPEG training augmentation on a pre-resized set", 2,
         r"data\.blur_prob 0\.5 / data\.jpeg_prob 0\.0: training augmentation acts on the full-size image",
         train_prepared(("--resize-shortest", "224"), blur_prob=0.5)),
    Case("eval-align-track-aligned-set", "ds-trainer eval --align-jpeg on a set whose fakes were prepared aligned", 2,
         r"--align-jpeg 96: shard set .* compressed twice",
         eval_prepared(("--align-jpeg", "96"), "--align-jpeg", "96")),
    Case("eval-perturb-resized-set", "ds-trainer eval --perturb on a pre-resized set", 2,
         r"--perturb: shard set .*resized to 224.* full-size images",
         eval_prepared(("--resize-shortest", "224", "--store", "raw"), "--perturb", "jpeg:75")),
    Case("report-reference-unknown", "ds-trainer report --reference with a name published.json does not have", 2,
         r"no published reference 'nope'; known: .*effort.*univfd_drct",
         lambda tmp, shards: ["report", "--eval", str(tmp / "ev.json"), "--out", str(tmp / "rep"),
                              "--reference", "nope"]),
    Case("report-published-bad", "ds-trainer report --published with a file that is not a published-results JSON", 3,
         r"bad\.json: expected \{\"version\": 1",
         lambda tmp, shards: (tmp / "bad.json").write_text('{"version": 7}') and [
             "report", "--eval", str(tmp / "ev.json"), "--out", str(tmp / "rep"), "--reference", "effort",
             "--published", str(tmp / "bad.json")]),
    Case("report-published-alone", "ds-trainer report --published without --reference", 2,
         r"--published gives the file --reference NAME reads; add --reference",
         lambda tmp, shards: ["report", "--eval", str(tmp / "ev.json"), "--out", str(tmp / "rep"),
                              "--published", str(tmp / "p.json")]),
    Case("svd-residual-r-zero", "model.svd_residual.r of 0 (mode svd-residual)", 2,
         r"model\.svd_residual\.r",
         train(model={"mode": "svd-residual", "svd_residual": {"r": 0}})),
    Case("svd-residual-r-too-large", "model.svd_residual.r at least the projection's smaller dimension", 2,
         r"model\.svd_residual\.r: 64 residual components of a 64x64 projection leave no frozen main part",
         train(model={"mode": "svd-residual", "svd_residual": {"r": 64}})),
    Case("svd-residual-unknown-projection", "model.svd_residual.projections naming no attention projection", 2,
         r"model\.svd_residual\.projections: fc1 is not a self-attention projection",
         train(model={"mode": "svd-residual", "svd_residual": {"projections": ["q_proj", "fc1"]}})),
    Case("svd-residual-freeze-backbone", "mode svd-residual with freeze_backbone", 2,
         r"mode svd-residual and freeze_backbone contradict",
         train(model={"mode": "svd-residual", "freeze_backbone": True})),
    Case("svd-residual-lora", "mode svd-residual with model.lora enabled", 2,
         r"mode svd-residual and lora\.enabled contradict",
         train(model={"mode": "svd-residual", "lora": {"enabled": True}})),
    Case("svd-residual-section-other-mode", "a model.svd_residual section while mode is fine-tune", 2,
         r"svd_residual applies to mode svd-residual, not fine-tune",
         train(model={"svd_residual": {"r": 2}})),
    Case("data-resize-shortest-below-crop", "data.resize_shortest smaller than data.image_size", 2,
         r"data: resize_shortest 48 is the side crop: resize scales to before its image_size 64 crop",
         train(data={"image_size": 64, "resize_shortest": 48})),
    Case("data-resize-shortest-native", "data.resize_shortest with crop: native (which does not resize)", 2,
         r"resize_shortest 256 .*give crop: resize",
         train(data={"crop": "native", "resize_shortest": 256})),
    # --- data.decode gpu: what acts on the decoded image in the loader workers, and samples that are not JPEG
    Case("data-decode-gpu-augment", "data.decode gpu with Blur/JPEG training augmentation", 2,
         r"data: decode gpu does not decode in the loader workers, where blur_prob \(0\.5\)",
         train(data={"decode": "gpu", "blur_prob": 0.5})),
    Case("data-decode-gpu-native", "data.decode gpu with crop: native", 2,
         r"data: decode gpu resizes on the device: it needs crop: resize, not native",
         train(data={"decode": "gpu", "crop": "native"})),
    Case("data-decode-gpu-draft", "data.decode gpu with data.jpeg_draft", 2,
         r"data: jpeg_draft shrinks JPEGs inside the workers' decoder; with decode gpu set it false",
         train(data={"decode": "gpu", "jpeg_draft": True})),
    Case("data-decode-gpu-load-time-align", "data.decode gpu with data.align_jpeg_quality on a set not prepared so", 2,
         r"data\.align_jpeg_quality 96 re-encodes the fakes .* ds-trainer prepare --align-jpeg 96",
         train(data={"decode": "gpu", "align_jpeg_quality": 96})),
    Case("data-decode-gpu-raw-store", "data.decode gpu on a set prepared with --store raw", 2,
         r"data\.decode gpu decodes JPEGs, but shard set .* was prepared with --store raw",
         train_prepared(("--align-jpeg", "96", "--store", "raw"), decode="gpu", align_jpeg_quality=96)),
    Case("data-decode-gpu-not-jpeg", "data.decode gpu on a selection with a sample that is not a JPEG", 3,
         r"data\.decode gpu needs every sample to be a JPEG; sample \S+ of .* is a \.png member: prepare the set",
         train(data={"decode": "gpu"})),
    Case("eval-perturb-decode-gpu", "ds-trainer eval --perturb with data.decode gpu", 2,
         r"--perturb and --align-jpeg act on the decoded image .* --set data\.decode=cpu",
         lambda tmp, shards: ["eval", "--config", str(config_with(tmp, shards, data={"decode": "gpu"})),
                              "--load-dir", str(saved_checkpoint(tmp, shards)), "--perturb", "jpeg:75"]),
]  # fmt: skip

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
