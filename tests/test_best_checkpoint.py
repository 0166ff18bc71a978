"""`best` is the improving epoch's files, linked, not a second full save; keep_last never takes what it uses."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ds_trainer import CLIPModel, Trainer, checkpoint, integrity
from ds_trainer.export import export_checkpoint


# ---------------------------------------------------------------------------------------------- the mechanism
def fake_tag(root: Path, tag: str, step: int) -> Path:
    """A complete tag as checkpoint.save leaves it: two files and a sealed marker with their digests."""
    d = root / tag
    d.mkdir(parents=True)
    files = {
        "mp_rank_00_model_states.pt": os.urandom(3000),
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(9000),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    digests = integrity.digests(d, sorted(files))
    state = {"version": 3, "epoch": step, "global_step": step, "files": {n: len(b) for n, b in files.items()},
             "sha256": digests}  # fmt: skip
    (d / checkpoint.MARKER).write_text(integrity.seal(state))
    return d


def inodes(tag_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in tag_dir.iterdir() if p.name != checkpoint.MARKER}


@pytest.mark.unit
def test_best_is_hard_links_to_the_epochs_files_and_its_own_marker(tmp_path):
    epoch = fake_tag(tmp_path, "epoch_1", 4)
    best = checkpoint.link_best(tmp_path, "epoch_1", rank=0)
    assert inodes(best) == inodes(epoch) and len(inodes(best)) == 2
    assert (best / checkpoint.MARKER).stat().st_ino != (epoch / checkpoint.MARKER).stat().st_ino  # a copy
    assert (best / checkpoint.MARKER).read_bytes() == (epoch / checkpoint.MARKER).read_bytes()
    integrity.verify(best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "epoch_1"]  # no .partial/.old left


@pytest.mark.unit
def test_a_new_best_replaces_the_old_one_and_pruning_never_takes_its_data(tmp_path):
    fake_tag(tmp_path, "epoch_1", 4)
    checkpoint.link_best(tmp_path, "epoch_1", rank=0)
    epoch_2 = fake_tag(tmp_path, "epoch_2", 8)
    checkpoint.link_best(tmp_path, "epoch_2", rank=0)
    assert inodes(tmp_path / "best") == inodes(epoch_2)
    kept = {n: (tmp_path / "best" / n).read_bytes() for n in inodes(epoch_2)}
    fake_tag(tmp_path, "epoch_3", 12)
    fake_tag(tmp_path, "epoch_4", 16)
    (tmp_path / "latest").write_text("epoch_4")
    deleted = checkpoint.prune(tmp_path, keep_last=1)  # best's epoch goes: only a name of its files
    assert sorted(d.name for d in deleted) == ["epoch_1", "epoch_2", "epoch_3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "epoch_4", "latest"]
    assert {n: (tmp_path / "best" / n).read_bytes() for n in kept} == kept
    integrity.verify(tmp_path / "best")
    assert checkpoint.resolve(tmp_path / "best") == (tmp_path, "best")


@pytest.mark.unit
@pytest.mark.parametrize("code", [errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP])
def test_without_hard_links_best_is_a_verified_copy(tmp_path, monkeypatch, code):
    epoch = fake_tag(tmp_path, "epoch_1", 4)

    def no_links(src, dst, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_links)
    best = checkpoint.link_best(tmp_path, "epoch_1", rank=0)
    assert set(inodes(best).values()).isdisjoint(inodes(epoch).values())
    integrity.verify(best)


@pytest.mark.unit
def test_a_full_disk_while_copying_best_is_one_checkpoint_error(tmp_path, monkeypatch):
    fake_tag(tmp_path, "epoch_1", 4)
    (tmp_path / "latest").write_text("epoch_1")

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    with pytest.raises(checkpoint.CheckpointError, match=r"no space left .* while saving best.*epoch_1 is intact"):
        checkpoint.link_best(tmp_path, "epoch_1", rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1", "latest"]


# ---------------------------------------------------------------------------------------------- in training
def trainer(tmp_path: Path, **kwargs) -> Trainer:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 224, 224, generator=g), torch.arange(32) % 2
    ds = TensorDataset(x, y)
    args = dict(learning_rate=1e-3, num_epochs=3, device="cpu", checkpoint_dir=str(tmp_path / "ckpt"),
                run_dir=str(tmp_path / "run"), monitor="val_loss", save_frequency=1)  # fmt: skip
    args.update(kwargs)
    return Trainer(CLIPModel("tiny"), DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=16), **args)


def written_bytes() -> int:
    """Bytes this process has passed to write() so far (/proc/self/io's wchar: any filesystem, tmpfs too)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def tag_bytes(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


def test_an_improving_epoch_writes_one_checkpoint_and_best_shares_its_inodes(tmp_path, monkeypatch):
    # min_delta 10 on val_loss: epoch 1 improves (the first value always does), epochs 2 and 3 cannot.
    t = trainer(tmp_path, min_delta=10.0)
    per_epoch: dict[int, int] = {}
    real_end = Trainer.end_epoch

    def measured(self, epoch, row):
        before = written_bytes()
        try:
            return real_end(self, epoch, row)
        finally:
            per_epoch[epoch] = written_bytes() - before

    saves: list[str] = []
    real_save = checkpoint.save

    def counted(engine, checkpoint_dir, tag, *args, **kwargs):
        saves.append(tag)
        return real_save(engine, checkpoint_dir, tag, *args, **kwargs)

    monkeypatch.setattr(Trainer, "end_epoch", measured)
    monkeypatch.setattr(checkpoint, "save", counted)
    rows = t.train()
    ckpt = tmp_path / "ckpt"
    assert [r["epoch"] for r in rows] == [1, 2, 3] and t.state.best.best_row["epoch"] == 1
    assert saves == ["epoch_1", "epoch_2", "epoch_3"]  # best is no save of its own
    assert inodes(ckpt / "best") == inodes(ckpt / "epoch_1")
    assert json.loads((ckpt / "best" / checkpoint.MARKER).read_text())["epoch"] == 1
    one = tag_bytes(ckpt / "epoch_1")
    assert one > 1_000_000  # the tiny CLIP's model and optimizer states
    # The improving epoch writes about what a plain one does: one checkpoint (saving best too wrote two).
    assert 0.9 * one < per_epoch[1] < 1.2 * one, (per_epoch, one)
    assert abs(per_epoch[1] - per_epoch[2]) < 0.1 * one, per_epoch
    integrity.verify(ckpt / "best")


def test_best_outlives_its_pruned_epoch_and_still_resumes_and_exports(tmp_path):
    t = trainer(tmp_path, min_delta=10.0, keep_last=1)
    t.train()
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["best", "epoch_3"]  # epoch_1 pruned
    integrity.verify(ckpt / "best")
    out = export_checkpoint(ckpt, tmp_path / "exported", tag="best")  # reloads it and compares logits
    assert json.loads((out / "ds_trainer_export.json").read_text())["source"]["epoch"] == 1
    again = trainer(tmp_path / "again", min_delta=10.0, num_epochs=2)
    state = again.resume_from_checkpoint(ckpt / "best")
    assert state["epoch"] == 1 and again.epoch == 1
    rows = again.train()
    assert [r["epoch"] for r in rows] == [2]
