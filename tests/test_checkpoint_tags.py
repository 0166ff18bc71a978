"""A tag is a plain name inside its checkpoint directory: `latest` or `--tag` naming a path is refused before
anything outside is opened, by resume, export, eval and predict alike.

The outside target is a complete copy of a real checkpoint, so following the path would succeed: only the
check stops it. An audit hook records every file opened and directory listed under it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import write_config

from ds_trainer import checkpoint, cli, integrity, tags
from ds_trainer.consolidate import resolve_source
from ds_trainer.errors import CheckpointError

_WATCHED: list[str] = []  # real paths whose opening is recorded
_TOUCHED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if not _WATCHED or event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        real = os.path.realpath(os.fsdecode(path))
        if any(real == w or real.startswith(w + os.sep) for w in _WATCHED):
            _TOUCHED.append(f"{event} {real}")


sys.addaudithook(_audit)  # audit hooks cannot be removed: it does nothing while _WATCHED is empty


@pytest.fixture
def outside(tmp_path, saved):
    """A complete checkpoint outside the one given as --load-dir; yields what was opened under it."""
    target = tmp_path / "outside"
    shutil.copytree(saved / "ckpt", target)
    _WATCHED.append(os.path.realpath(target))
    (target / "latest").read_text()
    assert _TOUCHED, "the audit hook records nothing"  # so an empty list below means something
    _TOUCHED.clear()
    yield target
    _WATCHED.clear()


@pytest.fixture
def saved(one_epoch_run) -> Path:
    return one_epoch_run  # one epoch through the CLI, shared by the session; every test copies it


@pytest.mark.unit
@pytest.mark.parametrize(
    "tag, why",
    [
        ("", "is empty"),
        (".", "is not a name"),
        ("..", "is not a name"),
        ("../other/epoch_1", "holds a path separator"),
        ("/abs/ckpt/epoch_1", "is an absolute path"),
        ("epoch_1/universal", "holds a path separator"),
        ("..\\other", "holds a path separator"),
        ("epoch\x001", "holds control characters"),
        ("best\n2", "holds control characters"),
        ("x" * 300, "is longer than 255 bytes"),
    ],
)
def test_a_tag_that_is_not_a_plain_name_is_refused(tag, why):
    with pytest.raises(CheckpointError, match=rf"--tag: tag .* {why}; a tag is a plain name") as caught:
        tags.check_name(tag, "--tag")
    assert len(str(caught.value).splitlines()) == 1 and len(str(caught.value)) < 400  # a long tag is cut


@pytest.mark.unit
@pytest.mark.parametrize("tag", ["epoch_3", "best", "step_40", "run.v2", "épreuve_1"])
def test_plain_names_pass(tag):
    assert tags.check_name(tag, "--tag") == tag


def load_dir(tmp_path: Path, saved: Path, latest: str | None, link: str | None = None, target: Path | None = None):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved / "ckpt", ckpt)
    if link is not None:
        (ckpt / link).symlink_to(target, target_is_directory=True)
    if latest is not None:
        (ckpt / "latest").write_text(latest)
    return ckpt


def latest_variants(outside: Path) -> dict[str, tuple[str, str | None]]:
    """id -> (what `latest` holds, a symlinked tag's name in the checkpoint directory)"""
    return {
        "absolute": (str(outside / "epoch_1"), None),
        "dotdot": ("../outside/epoch_1", None),
        "dotdot-bare": ("..", None),
        "empty": ("", None),
        "slash": ("nested/epoch_1", None),
        "symlink-out": ("evil", "evil"),
    }


def argv(cmd: str, ckpt: Path, tmp_path: Path, shards: Path, tag: str | None = None) -> list[str]:
    extra = [] if tag is None else ["--tag", tag]
    if cmd == "resume":
        cfg = write_config(tmp_path / "cfg.yaml", shards, training={"num_epochs": 2, "warmup_epochs": 0})
        return ["train", "--config", str(cfg), "--load-dir", str(ckpt)]
    if cmd == "export":
        return ["export", "--load-dir", str(ckpt), *extra, "--out", str(tmp_path / "exported")]
    if cmd == "eval":
        return ["eval", "--load-dir", str(ckpt), *extra, "--out", str(tmp_path / "eval.json")]
    return ["predict", "--model", str(ckpt), str(tmp_path / "img.png")]


@pytest.mark.parametrize("variant", ["absolute", "dotdot", "dotdot-bare", "empty", "slash", "symlink-out"])
@pytest.mark.parametrize("cmd", ["resume", "export", "eval", "predict"])
def test_latest_naming_a_path_is_refused_before_anything_outside_is_opened(saved, outside, tmp_path, tiny_shards,
                                                                           capsys, cmd, variant):  # fmt: skip
    latest, link = latest_variants(outside)[variant]
    ckpt = load_dir(tmp_path, saved, latest, link, outside / "epoch_1")
    assert cli.main(argv(cmd, ckpt, tmp_path, tiny_shards)) == CheckpointError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("ds-trainer ") and "Traceback" not in "\n".join(err), err
    if cmd != "predict":  # predict says the directory is no export (the reason is the same refusal)
        assert "latest" in err[-1] and ("plain name" in err[-1] or "symbolic link" in err[-1]), err[-1]
    assert _TOUCHED == []
    assert not (tmp_path / "exported").exists() and not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("variant", ["dotdot", "absolute", "empty", "slash", "symlink-out"])
@pytest.mark.parametrize("cmd", ["export", "eval"])
def test_a_tag_option_naming_a_path_is_refused_before_anything_outside_is_opened(saved, outside, tmp_path,
                                                                                  tiny_shards, capsys, cmd, variant):  # fmt: skip
    tag = {"dotdot": "../outside/epoch_1", "absolute": str(outside / "epoch_1"), "empty": "", "slash": "x/epoch_1",
           "symlink-out": "evil"}[variant]  # fmt: skip
    ckpt = load_dir(tmp_path, saved, None, "evil", outside / "epoch_1")
    assert cli.main(argv(cmd, ckpt, tmp_path, tiny_shards, tag=tag)) == CheckpointError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ds-trainer ") and "--tag" in err[-1] and "Traceback" not in "\n".join(err), err
    assert _TOUCHED == []


def test_a_tag_directory_linking_outside_is_skipped_when_looking_for_the_newest(saved, outside, tmp_path):
    ckpt = tmp_path / "only-link"
    ckpt.mkdir()
    (ckpt / "epoch_9").symlink_to(outside / "epoch_1", target_is_directory=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.resolve(ckpt)
    assert _TOUCHED == []


def test_a_tag_linking_to_another_tag_of_the_same_directory_is_allowed(saved, tmp_path):
    ckpt = load_dir(tmp_path, saved, "alias", "alias", Path("epoch_1"))  # a relative link: best -> epoch_3 style
    assert checkpoint.resolve(ckpt) == (ckpt, "alias")
    source = resolve_source(ckpt, "alias")
    assert source.meta.epoch == 1
    integrity.verify(source.tag_dir)
