"""Security: nothing from a config is run as code, our own files load without pickle, exports are
safetensors, and secrets in the environment never reach logs, the saved config or checkpoints."""

from __future__ import annotations

import ast
import json

import pytest
from conftest import REPO, write_config

from ds_trainer import cli
from ds_trainer.config import load_config

PACKAGE = REPO / "ds_trainer"
# The one exec: ds_compat recompiles a DeepSpeed method from DeepSpeed's own source with a fix.
ALLOWED_EXEC = {"ds_compat.py"}


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


@pytest.mark.unit
def test_no_eval_exec_pickle_or_unsafe_yaml_in_the_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node, owner, name in calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            bare = isinstance(node.func, ast.Name)  # eval(...), not model.eval()
            if bare and (name == "eval" or (name == "exec" and path.name not in ALLOWED_EXEC)):
                found.append(f"{where} {name}()")
            if owner in ("pickle", "marshal") and name in ("load", "loads"):
                found.append(f"{where} {owner}.{name}()")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                if not (isinstance(loader, ast.Name) and loader.id in ("_Loader", "SafeLoader", "CSafeLoader")):
                    found.append(f"{where} yaml.{name}() without a safe loader")
            if owner == "torch" and name == "load":
                wo = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{where} torch.load() without weights_only=True")
    assert found == []


@pytest.mark.unit
def test_a_python_tag_in_yaml_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(Exception, match="line 1"):
        load_config(cfg)
    assert not (tmp_path / "pwned").exists()


SECRETS = {
    "WANDB_API_KEY": "wandb-secret-0123456789abcdef",
    "HF_TOKEN": "hf_secrettoken0123456789",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-0123456789",
}


def test_secrets_never_reach_logs_configs_or_checkpoints(tmp_path, tiny_shards, monkeypatch, capsys):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_shards,
        training={"num_epochs": 1, "warmup_epochs": 0},
        logging={"wandb": {"enabled": True, "mode": "offline"}},
    )
    assert cli.main(["--debug", "train", "--config", str(cfg)]) == 0  # debug: the most verbose logs
    out = capsys.readouterr()
    assert (tmp_path / "run" / "wandb").is_dir()  # W&B really ran (offline) and wrote its files
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.name == "config.yaml" for p in files)
    leaks = [
        f"{p.relative_to(tmp_path)}: {k}" for p in files for k, v in SECRETS.items() if v.encode() in p.read_bytes()
    ]
    leaks += [f"console: {k}" for k, v in SECRETS.items() if v in out.out + out.err]
    assert leaks == []


def test_exports_are_safetensors_and_hold_no_pickle(tmp_path, tiny_shards):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0})
    assert cli.main(["train", "--config", str(cfg)]) == 0
    assert cli.main(["export", "--load-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")]) == 0
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert any(n.endswith(".safetensors") for n in names), names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names
    json.loads((tmp_path / "export" / "config.json").read_text())


@pytest.mark.unit
def test_readme_warns_that_deepspeed_checkpoints_are_pickles():
    text = " ".join((REPO / "README.md").read_text().split())
    assert "DeepSpeed checkpoints are pickles" in text and "trusted" in text
