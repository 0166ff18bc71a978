"""The Trainer's policies and its checkpoint metadata, without an engine: best/early stopping, the epoch
checkpoint schedule, resumable state, the metadata's versions, the resume plan, the derived settings."""

import contextlib
import json
import logging
import math

import pytest
from checkpoint_layouts import V1_TOTALS

from ds_trainer import resume
from ds_trainer.config import build_config
from ds_trainer.engine import effective_config, eval_settings, micro_batch_size, resolve_monitor, training_settings
from ds_trainer.errors import CheckpointError, ConfigError
from ds_trainer.hooks import Hook, Hooks
from ds_trainer.state import BestTracker, EpochTotals, Progress, TrainState, epoch_checkpoint_due

pytestmark = pytest.mark.unit


# ----------------------------------------------------------------------------------- best, early stopping
def test_higher_is_better_improves_only_past_min_delta():
    best = BestTracker("val_auc", higher_is_better=True, min_delta=0.01)
    assert best.update(0.80, {"epoch": 1, "val_auc": 0.80, "note": "x"}).improved
    assert best.best_row == {"epoch": 1, "val_auc": 0.80}  # numbers only
    assert not best.update(0.805).improved  # within min_delta
    assert best.update(0.82).improved and best.best_metric == 0.82 and best.epochs_without_improvement == 0


def test_lower_is_better_and_nan_never_improves():
    best = BestTracker("val_loss", higher_is_better=False)
    assert best.update(0.5).improved
    assert not best.update(math.nan).improved
    assert not best.update(0.6).improved and best.epochs_without_improvement == 2
    assert best.update(0.4).improved and best.best_metric == 0.4


def test_a_nan_first_epoch_is_no_best():
    best = BestTracker("val_auc", higher_is_better=True)
    assert not best.update(math.nan).improved and best.best_metric is None


@pytest.mark.parametrize("early_stopping, expected_stop", [(True, [False, False, True]), (False, [False] * 3)])
def test_early_stopping_after_patience_epochs_without_improvement(early_stopping, expected_stop):
    best = BestTracker("val_auc", True, patience=2, early_stopping=early_stopping)
    stops = [best.update(v).stop for v in (0.9, 0.8, 0.85)]
    assert stops == expected_stop


def test_best_tracker_round_trip_and_a_changed_monitor_resets():
    best = BestTracker("val_auc", True)
    best.update(0.7, {"epoch": 1})
    best.update(0.6)
    again = BestTracker("val_auc", True)
    again.load_state_dict(json.loads(json.dumps(best.state_dict())))
    assert (again.best_metric, again.best_row, again.epochs_without_improvement) == (0.7, {"epoch": 1}, 1)
    other = BestTracker("val_loss", False)
    other.load_state_dict(best.state_dict())
    assert other.best_metric is None and other.epochs_without_improvement == 0


@pytest.mark.parametrize("epoch, freq, stopping, due", [
    (5, 0, False, True),  # the last epoch always
    (2, 0, False, False),  # save_frequency 0: only the last
    (2, 2, False, True), (3, 2, False, False),
    (3, 0, True, True),  # stopping early
])  # fmt: skip
def test_epoch_checkpoint_schedule(epoch, freq, stopping, due):
    assert epoch_checkpoint_due(epoch, 5, freq, stopping) is due


# ------------------------------------------------------------------------------------- resumable state
def test_epoch_totals_add_and_read_both_layouts():
    a = EpochTotals(1.0, 2.0, 3.0, 4.0, 5.0)
    assert a + EpochTotals(seen=1.0) == EpochTotals(1.0, 2.0, 4.0, 4.0, 5.0)
    assert EpochTotals.from_state([1, 2, 3, 4, 5]) == a  # v1's positional list
    assert EpochTotals.from_state([1, 2, 3, 4]) == EpochTotals(1.0, 2.0, 3.0, 4.0, 0.0)
    assert EpochTotals.from_state(a.state_dict()) == a
    assert EpochTotals.from_state(None) is None


def test_progress_records_a_preemption_only_while_one_is_pending():
    p = Progress(epoch=1, batches_done=3, partial=EpochTotals(seen=24.0), data=[{"r": 0}, {"r": 1}])
    state = json.loads(json.dumps(p.state_dict()))
    assert state["partial_epoch"]["seen"] == 24.0 and state["data"] == [{"r": 0}, {"r": 1}]
    q = Progress()
    q.load_state_dict(state)
    assert q == p
    assert q.data_for(1, 2) == {"r": 1} and q.data_for(0, 1) is None  # another world size: no position
    q.start_epoch()
    assert q.state_dict() == {"epoch": 1, "batches_done": 0, "partial_epoch": None, "data": None}


def test_train_state_round_trip():
    s = TrainState(BestTracker("train_loss", False))
    s.progress.epoch = 3
    s.best.update(0.25, {"epoch": 3})
    s.plateau = {"scale": 0.1}
    again = TrainState(BestTracker("train_loss", False))
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert again.state_dict() == s.state_dict()


# -------------------------------------------------------------------------------------- the metadata file
def write_marker(tag_dir, record):
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / "ds_trainer.json").write_text(json.dumps(record))
    return tag_dir


V1 = {"version": 1, "epoch": 1, "batches_done": 2, "global_step": 8, "world_size": 2, "train_batch_size": 32,
      "micro_batch_size": 8, "grad_accumulation_steps": 2, "partial_epoch": [1.5, 10.0, 16.0, 0.0, 0.0],
      "config": {"model": {"model_name": "tiny"}}}  # fmt: skip


def test_a_version_1_record_is_upgraded(tmp_path):
    meta = resume.read(write_marker(tmp_path / "epoch_1", V1))
    assert meta.state["version"] == resume.VERSION
    assert meta.state["partial_epoch"] == dict(zip(V1_TOTALS, [1.5, 10.0, 16.0, 0.0, 0.0]))
    assert meta.split_groups  # no param_groups: written before groups were merged
    assert (meta.epoch, meta.global_step, meta.world_size, meta.batches_done) == (1, 8, 2, 2)
    merged = resume.read(write_marker(tmp_path / "epoch_2", {**V1, "param_groups": ["all", "all_no_decay"]}))
    assert not merged.split_groups


@pytest.mark.parametrize("record", [{}, [], {"epoch": 1}, "x"])
def test_a_record_that_is_not_a_checkpoints_is_refused_by_name(tmp_path, record):
    with pytest.raises(CheckpointError, match=r"epoch_1/ds_trainer.json is not a ds_trainer checkpoint record"):
        resume.read(write_marker(tmp_path / "epoch_1", record))


def test_a_newer_layout_and_unreadable_json_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="layout version 9.*upgrade ds_trainer"):
        resume.read(write_marker(tmp_path / "a", {**V1, "version": 9}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ds_trainer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        resume.read(tmp_path / "b")


def test_export_and_eval_need_the_run_config(tmp_path):
    meta = resume.read(write_marker(tmp_path / "epoch_1", {k: v for k, v in V1.items() if k != "config"}))
    with pytest.raises(CheckpointError, match="no run config"):
        meta.run_config()


# ------------------------------------------------------------------------------------------ resume plan
def test_same_world_size_keeps_the_config(tmp_path):
    meta = resume.read(write_marker(tmp_path / "e", V1))
    assert resume.plan(meta, 2, 8, 2) == resume.ResumePlan(split_groups=True)


def test_another_world_size_keeps_the_global_batch(tmp_path):
    tag = write_marker(tmp_path / "e", V1)
    assert resume.plan(resume.read(tag), 1, 8, 2) == resume.ResumePlan(4, universal=False, split_groups=True)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert resume.plan(resume.read(tag), 4, 8, 2).universal
    assert resume.plan(resume.read(tag), 4, 8, 2).grad_accumulation_steps == 1


@pytest.fixture
def heard(caplog, monkeypatch):
    """caplog, also after an in-process run set the package logger not to propagate (sinks/logs.py)."""
    monkeypatch.setattr(logging.getLogger("ds_trainer"), "propagate", True)
    return caplog


def test_an_elastic_resume_says_rank_in_the_singular(tmp_path, heard):
    caplog = heard
    meta = resume.read(write_marker(tmp_path / "e", V1))
    with caplog.at_level("INFO", logger="ds_trainer.resume"):
        resume.plan(meta, 1, 8, 2)
    assert "resuming a 2-rank checkpoint on 1 rank: grad_accumulation_steps 4 (config: 2)" in caplog.text


def _saved_with(tmp_path, then, now):
    from ds_trainer.checkpoint import config_hash

    meta = resume.read(write_marker(tmp_path / "e", {**V1, "config": then, "config_hash": config_hash(then)}))
    return meta, now


def test_the_config_warning_names_each_key_once_on_rank_0_and_not_what_a_resume_handles(tmp_path, heard):
    caplog = heard
    then = build_config({"training": {"num_epochs": 2, "batch_size": 8}}).to_dict()
    # Another world size: the plan replaces micro-batch and accumulation to keep the global batch; more epochs.
    elastic = build_config({"training": {"num_epochs": 3, "batch_size": 16, "grad_accumulation_steps": 2}}).to_dict()
    changed = build_config({"training": {"num_epochs": 2, "batch_size": 8, "learning_rate": 2e-4}}).to_dict()
    plan = resume.ResumePlan(grad_accumulation_steps=1)
    with caplog.at_level("WARNING", logger="ds_trainer.resume"):
        resume.warn_if_config_differs(*_saved_with(tmp_path, then, elastic), is_main=True,
                                      ignore=resume.ignored_differences(plan))  # fmt: skip
        assert caplog.text == ""
        resume.warn_if_config_differs(*_saved_with(tmp_path, then, changed), is_main=False)
        assert caplog.text == ""  # rank 1 says nothing: rank 0 says it once
        resume.warn_if_config_differs(*_saved_with(tmp_path, then, changed), is_main=True)
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage() == (
        "the config differs from the checkpoint's: training.learning_rate 0.0001 -> 0.0002; continuing with this "
        "run's values"
    )
    # On the same world size the micro-batch is a real difference (the global batch changes with it).
    assert resume.config_differences(then, elastic, ignore=resume.ignored_differences(resume.ResumePlan())) == [
        "training.batch_size", "training.grad_accumulation_steps"]  # fmt: skip


@pytest.mark.parametrize("world, micro", [(3, 8), (1, 64)])
def test_a_global_batch_the_new_world_cannot_keep_is_refused(tmp_path, world, micro):
    meta = resume.read(write_marker(tmp_path / "e", V1))
    with pytest.raises(ConfigError, match="global batch of 32"):
        resume.plan(meta, world, micro, 2)


def test_config_differences_name_the_keys():
    then = {"model": {"a": 1}, "training": {"lr": 1, "checkpoint_dir": "x", "n": {"k": 1}}, "logging": {"x": 1}}
    now = {"model": {"a": 1}, "training": {"lr": 2, "checkpoint_dir": "y", "n": {"k": 2}}, "logging": {"x": 2}}
    assert resume.config_differences(then, now) == ["training.lr", "training.n.k"]
    assert resume.config_differences(None, now) == []


# ------------------------------------------------------------------------------------- derived settings
class _Loader:
    def __init__(self, batch_size, n=5):
        self.batch_size, self.n = batch_size, n

    def __len__(self):
        return self.n


def test_the_loaders_batch_size_is_used_and_an_explicit_other_one_refused():
    assert micro_batch_size(build_config({}).training, _Loader(4)) == 4
    with pytest.raises(ConfigError, match="batch_size is 8, but train_loader yields batches of 4"):
        micro_batch_size(build_config({"training": {"batch_size": 8}}).training, _Loader(4))


def test_the_monitor_falls_back_to_train_loss_only_when_not_asked_for():
    assert resolve_monitor(build_config({}).training, has_val=False) == "train_loss"
    assert resolve_monitor(build_config({}).training, has_val=True) == "val_auc"
    with pytest.raises(ConfigError, match="no validation set"):
        resolve_monitor(build_config({"training": {"monitor": "val_auc"}}).training, has_val=False)


def test_derived_settings_never_change_the_config():
    cfg = build_config({"deepspeed": {"zero_stage": 2}})
    before = cfg.to_dict()
    s = training_settings(cfg, 2, _Loader(4), val_loader=None, plan=resume.ResumePlan(grad_accumulation_steps=3))
    assert (s.batch_size, s.grad_accumulation_steps, s.monitor, s.steps_per_epoch) == (4, 3, "train_loss", 5)
    assert s.samples_per_step == 4 * 3 * 2
    eff = effective_config(cfg, s)
    assert (eff.training.batch_size, eff.training.grad_accumulation_steps, eff.training.monitor) == (4, 3, "train_loss")
    assert eval_settings(cfg, 1).zero_stage == 0  # no optimizer state to shard
    assert cfg.to_dict() == before


# ----------------------------------------------------------------------------------------------- hooks
def test_hooks_call_only_what_a_hook_overrides_and_ask_every_poll():
    calls = []

    class Stop(Hook):
        def __init__(self, name, answer):
            self.name, self.answer = name, answer

        def should_stop(self):
            calls.append(self.name)
            return self.answer

    class Loss(Hook):
        def on_loss(self, micro_batch, loss):
            return loss * 2

    class Measure(Hook):
        def measure(self):
            calls.append("measure")
            return contextlib.nullcontext()

    hooks = Hooks([Stop("a", True), Loss(), Stop("b", False)])
    assert hooks.should_stop() and calls == ["a", "b"]  # every rank's collective poll runs, even after a yes
    assert hooks.on_loss(1, 3) == 6
    assert isinstance(hooks.measure(), contextlib.nullcontext)  # no hook measures: nothing to enter per batch
    with Hooks([Measure(), Loss()]).measure():
        assert calls[-1] == "measure"
