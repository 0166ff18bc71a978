"""What is loaded is verified: a flipped byte anywhere in a checkpoint is refused by name before anything loads it.

One real one-rank checkpoint (tiny CLIP, ZeRO 1: a model-states and an optimizer-states file) is
trained once for the module; each variant copies it, flips one byte, and runs the real CLI in this
process: resume (`train --load-dir`), `export` and `eval`. `torch.load` is watched: no variant may
reach it for a file of the damaged checkpoint (DeepSpeed's load_checkpoint and zero_to_fp32 go
through it too).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_layouts import rewrite_as_v1
from conftest import write_config

from ds_trainer import checkpoint, cli, integrity, resume
from ds_trainer.errors import CheckpointError

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MARKER = "ds_trainer.json"


@pytest.fixture
def saved(one_epoch_run) -> Path:
    """One epoch of the tiny CLIP through the CLI (shared by the session): checkpoint_dir with epoch_1, best and latest."""
    return one_epoch_run


def copy_of(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config for one more epoch, checkpoint_dir) of a fresh copy (best's hard links become files of their own)."""
    shutil.copytree(saved / "ckpt", tmp_path / "ckpt")
    shards = json.loads((saved / "ckpt" / "epoch_1" / MARKER).read_text())["config"]["data"]["shards"]
    cfg = write_config(tmp_path / "cfg.yaml", Path(shards), training={"num_epochs": 2, "warmup_epochs": 0})
    return cfg, tmp_path / "ckpt"


def flip(path: Path, where: str) -> int:
    """XOR one byte of `path` with 1 at its start, middle or end; returns the offset."""
    data = bytearray(path.read_bytes())
    offset = {"start": 0, "middle": len(data) // 2, "end": len(data) - 1}[where]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return offset


@pytest.fixture
def torch_loads(monkeypatch, tmp_path):
    """Every file under tmp_path that torch.load is asked to read."""
    seen: list[str] = []
    real = torch.load

    def spy(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and str(tmp_path) in str(Path(f).resolve()):
            seen.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return seen


@pytest.fixture
def unverified():
    """The messages of integrity's 'records no file digests' warnings (ds_trainer's loggers do not propagate)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "records no file digests" in record.getMessage():
                messages.append(record.getMessage())

    handler, logger = Keep(logging.WARNING), logging.getLogger("ds_trainer.integrity")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def command(name: str, cfg: Path, ckpt: Path, tmp_path: Path) -> list[str]:
    return {
        "resume": ["train", "--config", str(cfg), "--load-dir", str(ckpt)],
        "export": ["export", "--load-dir", str(ckpt), "--out", str(tmp_path / "exported")],
        "eval": ["eval", "--load-dir", str(ckpt), "--out", str(tmp_path / "eval.json")],
    }[name]


COMMANDS = ("resume", "export", "eval")


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("name", [MODEL, OPTIM, MARKER])
@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_flipped_byte_is_refused_by_name_before_anything_loads_it(saved, tmp_path, torch_loads, capsys, cmd, name,
                                                                     where):  # fmt: skip
    cfg, ckpt = copy_of(saved, tmp_path)
    flip(ckpt / "epoch_1" / name, where)
    assert cli.main(command(cmd, cfg, ckpt, tmp_path)) == CheckpointError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    message = err[-1]
    assert message.startswith("ds-trainer ") and name in message and "epoch_1" in message, err
    assert "Traceback" not in "\n".join(err)
    assert torch_loads == []  # DeepSpeed (and zero_to_fp32, and export) never read the damaged files
    assert not (tmp_path / "exported").exists() and not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("key", ["global_step", "epoch", "best_metric", "version"])
def test_a_changed_value_in_the_marker_that_is_still_valid_json_is_refused(saved, tmp_path, key):
    _, ckpt = copy_of(saved, tmp_path)
    marker = ckpt / "epoch_1" / MARKER
    text = marker.read_text()
    start = text.index(f'"{key}": ') + len(f'"{key}": ')
    at = min(text.index(",", start), text.index("\n", start)) - 1  # the value's last digit
    changed = text[:at] + chr(ord(text[at]) ^ 0x01) + text[at + 1 :]  # one digit flipped: 1 -> 0, 3 -> 2 ...
    json.loads(changed)  # still JSON: only the seal can tell
    marker.write_text(changed)
    with pytest.raises(CheckpointError, match=r"epoch_1/ds_trainer\.json is damaged: its content does not match"):
        resume.read(ckpt / "epoch_1")
    with pytest.raises(CheckpointError, match=r"ds_trainer\.json is damaged"):
        checkpoint.resolve(ckpt)  # latest names it: refused, not passed over for another tag


def test_a_marker_without_its_seal_a_missing_file_and_an_added_file_are_refused(saved, tmp_path):
    _, ckpt = copy_of(saved, tmp_path)
    tag = ckpt / "epoch_1"
    state = json.loads((tag / MARKER).read_text())
    del state[integrity.SEAL]
    (tag / MARKER).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"has no marker_sha256"):
        integrity.verify(tag)
    (tag / MARKER).write_text(integrity.seal(state))
    shutil.copyfile(tag / OPTIM, tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # DeepSpeed would load it
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt is not listed"):
        integrity.verify(tag)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    for name in ("../../outside.pt", "/etc/hostname"):  # a listed name never leads out of the tag
        listed = {**state, "files": {name: 1}, "sha256": {name: "0" * 64}}
        (tag / MARKER).write_text(integrity.seal(listed))
        with pytest.raises(CheckpointError, match=r"is damaged: it lists .*, outside"):
            integrity.verify(tag)
    (tag / MARKER).write_text(integrity.seal(state))
    (tag / MODEL).unlink()
    with pytest.raises(CheckpointError, match=rf"missing {MODEL}"):
        integrity.verify(tag)


def test_the_marker_records_a_sha256_of_every_file_and_is_sealed(saved):
    tag = saved / "ckpt" / "epoch_1"
    state = json.loads((tag / MARKER).read_text())
    assert state["version"] == resume.VERSION == 3
    assert sorted(state["sha256"]) == sorted(state["files"]) == [MODEL, OPTIM]
    for name, digest in state["sha256"].items():
        assert digest == integrity.file_digest(tag / name) and len(digest) == 64
    integrity.verify(tag)  # the intact checkpoint passes


def test_an_intact_copy_resumes_exports_and_evaluates(saved, tmp_path, torch_loads, unverified):
    cfg, ckpt = copy_of(saved, tmp_path)
    for cmd in COMMANDS:
        assert cli.main(command(cmd, cfg, ckpt, tmp_path)) == 0, cmd
    assert torch_loads  # the files really were loaded, after the check
    assert unverified == []
    assert json.loads((ckpt / "epoch_2" / MARKER).read_text())["epoch"] == 2


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_a_checkpoint_from_before_digests_loads_after_one_warning(saved, tmp_path, unverified, layout):
    cfg, ckpt = copy_of(saved, tmp_path)
    tag = ckpt / "epoch_1"
    if layout == "v1":
        rewrite_as_v1(tag)
    else:
        state = json.loads((tag / MARKER).read_text())
        for key in ("sha256", integrity.SEAL):
            del state[key]
        (tag / MARKER).write_text(json.dumps({**state, "version": 2}, indent=2))
    assert cli.main(command("export", cfg, ckpt, tmp_path)) == 0
    assert cli.main(command("eval", cfg, ckpt, tmp_path)) == 0
    assert len(unverified) == 2 and all("epoch_1" in w for w in unverified), unverified  # once per command
    assert cli.main(command("resume", cfg, ckpt, tmp_path)) == 0
    assert len(unverified) == 3
    integrity.verify(ckpt / "epoch_2")  # and what it saves next has digests
    assert "sha256" in json.loads((ckpt / "epoch_2" / MARKER).read_text())


@pytest.mark.unit
def test_a_seal_covers_content_with_non_finite_values_whatever_the_formatting(tmp_path):
    # A plateau or a one-class validation set leaves Infinity/NaN in the marker (json writes them as such).
    state = {"version": 3, "epoch": 1, "global_step": 4, "best_metric": float("inf"), "val": float("nan"),
             "files": {}, "sha256": {}}  # fmt: skip
    raw = json.loads(integrity.seal(state))
    integrity.check_seal(raw, tmp_path / MARKER)
    integrity.check_seal(json.loads(json.dumps(raw)), tmp_path / MARKER)  # compact: same content, same seal
    with pytest.raises(CheckpointError, match="is damaged"):
        integrity.check_seal({**raw, "best_metric": 1.0}, tmp_path / MARKER)
