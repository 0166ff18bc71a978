"""Metric sinks: console, metrics.jsonl, steps.jsonl, TensorBoard, W&B (offline), logging.

Pure Python and fast: no DeepSpeed, no network. Each backend is read back with its own
reader (TensorBoard's EventAccumulator, W&B's record protobufs), not just checked for files.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ds_trainer.config import LoggingSection
from ds_trainer.errors import ConfigError
from ds_trainer.sinks import (
    CompositeSink,
    MetricsSinks,
    Sink,
    TensorBoardSink,
    configure_logging,
    progress_enabled,
    progress_mode,
    redact_secrets,
)

ROW = {
    "epoch": 1,
    "train_loss": 0.284,
    "train_acc": 0.869,
    "samples_per_s": 123.5,
    "epoch_time_s": 4.0,
    "val_loss": 0.3,
    "val_acc": 0.85,
    "val_auc": float("nan"),
    "val_ap": 0.9,
    "val_samples": 24,
    "step": 20,
    "lr": 1e-4,
    "monitor": "train_loss",
}


def _cfg(**kw: Any) -> LoggingSection:
    return LoggingSection.model_validate(kw)


@pytest.fixture
def restore_logging():
    """Put the package logger back as it was: other tests' output must not land here."""
    root = logging.getLogger("ds_trainer")
    level, handlers, propagate = root.level, list(root.handlers), root.propagate
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    root.propagate = propagate


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No key, no network: W&B resolves to offline and keeps its files in tmp."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def _read_wandb_records(run_file: Path) -> list[Any]:
    """Decode a `.wandb` file: a LevelDB-style log of `wandb_internal_pb2.Record` messages.

    Offline runs in wandb 0.31 write no wandb-summary.json or config.yaml, and the SDK has no
    Python reader any more, so this follows the format: a 7-byte file header (":W&B", magic,
    version), then 32 KiB blocks of chunks, each `<crc32, length, type>` (FULL=1, FIRST=2,
    MIDDLE=3, LAST=4); a block tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    if len(data) < 7:  # not even the header flushed yet
        return []
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding to the block's end
            pos += left - 7
            continue
        if pos + length > len(data):  # a chunk still being written
            break
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wait_for_wandb_records(run_dir: Path, timeout_s: float = 20.0) -> list[Any]:
    """The run's records once its `exit` record is on disk.

    `run.finish()` returns before wandb-core has flushed the offline `.wandb` file (seen:
    a header and no records right after finish, complete a moment later), so poll.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        records = _read_wandb_records(files[0]) if files else []
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            assert "exit" in kinds, f"no complete W&B run under {run_dir}: {kinds}"
            return records
        time.sleep(0.05)


def _wandb_history(records: list[Any]) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


def _wandb_config(records: list[Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        update = r.run.config.update if kind == "run" else None
        update = r.config.update if kind == "config" else update
        for item in update or ():
            config[item.key] = json.loads(item.value_json)
    return config


# ------------------------------------------------------------------ jsonl and console


def test_metrics_jsonl_nan_is_null_and_console_lines(tmp_path, capsys, restore_logging):
    configure_logging(0, None, debug=False)
    sinks = MetricsSinks(tmp_path, True, _cfg(tensorboard=False))
    sinks.write(ROW)
    sinks.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{**ROW, "val_auc": None}]
    out = capsys.readouterr().out
    assert "Train Loss: 0.284, Train Acc: 0.869 | Val Loss: 0.300, Val Acc: 0.850, Val AUC: nan" in out


def test_the_epoch_line_says_which_epoch_of_how_many_the_step_and_the_time(tmp_path, capsys, restore_logging,
                                                                           monkeypatch):  # fmt: skip
    configure_logging(0, None, debug=False)
    clock = iter([1000.0, 1000.0 + 3725.0, 2000.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    sinks = MetricsSinks(None, True, _cfg(tensorboard=False), num_epochs=10)
    sinks.write({**ROW, "epoch": 3, "step": 240})
    sinks.close()
    assert capsys.readouterr().out == (
        "Epoch 3/10, step 240, 1:02:05 elapsed | Train Loss: 0.284, Train Acc: 0.869 | "
        "Val Loss: 0.300, Val Acc: 0.850, Val AUC: nan\n"
    )


def test_old_constructor_still_works(tmp_path):
    sinks = MetricsSinks(tmp_path, True)
    sinks.write(ROW)
    sinks.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_tensorboard_is_on_by_default_in_the_config(tmp_path):
    sinks = MetricsSinks(tmp_path, True, LoggingSection())
    sinks.close()
    assert (tmp_path / "tensorboard").is_dir()


def test_steps_jsonl_has_one_line_per_call(tmp_path):
    sinks = MetricsSinks(tmp_path, True, _cfg(tensorboard=False))
    sinks.step(10, {"train/loss": 0.7, "train/lr_head": 1e-4, "train/grad_norm": float("inf")})
    sinks.step(20, {"train/loss": 0.6, "train/lr_head": 2e-4})
    # Line-buffered: readable before close().
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    # Each row carries its wall-clock time (time to first step, step rates).
    assert all(abs(r.pop("time") - time.time()) < 60 for r in rows)
    assert rows == [
        {"step": 10, "train/loss": 0.7, "train/lr_head": 1e-4, "train/grad_norm": None},
        {"step": 20, "train/loss": 0.6, "train/lr_head": 2e-4},
    ]
    sinks.close()
    sinks.close()  # idempotent
    sinks.step(30, {"train/loss": 0.5})  # after close the jsonl still records
    last = json.loads((tmp_path / "steps.jsonl").read_text().splitlines()[-1])
    last.pop("time")
    assert last == {"step": 30, "train/loss": 0.5}


def test_non_main_rank_writes_nothing(tmp_path, monkeypatch, capsys):
    import wandb

    def fail(**kw):
        raise AssertionError("wandb.init on a non-main rank")

    monkeypatch.setattr(wandb, "init", fail)
    run_dir = tmp_path / "run"
    cfg = _cfg(wandb={"enabled": True, "mode": "offline"})
    sinks = MetricsSinks(run_dir, False, cfg, run_config={"a": 1})
    # The no-op itself, not a composite that checks the rank in every method.
    assert type(sinks) is Sink
    with sinks as entered:
        assert entered is sinks
        sinks.step(1, {"train/loss": 1.0})
        sinks.write(ROW)
        sinks.rewind(0, 0)
        sinks.pr_curves(1, {"score": [0.5], "label": [1]})
        assert sinks.wandb_run is None
    sinks.close()
    assert not run_dir.exists()
    assert "Train Loss" not in capsys.readouterr().out


# ------------------------------------------------------------------ lifecycle


class _Recording(Sink):
    def __init__(self, log: list[str], name: str, fail_close: bool = False) -> None:
        self.log, self.name, self.fail_close = log, name, fail_close

    def step(self, global_step, scalars):
        self.log.append(f"{self.name}.step")

    def close(self):
        self.log.append(f"{self.name}.close")
        if self.fail_close:
            raise RuntimeError(f"{self.name} cannot close")


def test_context_manager_closes_every_backend_when_the_body_raises():
    calls: list[str] = []
    sinks = CompositeSink([_Recording(calls, "a"), _Recording(calls, "b")])
    with pytest.raises(ValueError, match="body"), sinks as entered:  # noqa: PT012 - the body runs inside the sinks
        assert entered is sinks
        sinks.step(1, {"train/loss": 1.0})
        raise ValueError("body")
    assert calls == ["a.step", "b.step", "a.close", "b.close"]


def test_a_backend_failing_to_close_does_not_keep_the_others_open(caplog):
    calls: list[str] = []
    sinks = CompositeSink(
        [_Recording(calls, "a", fail_close=True), _Recording(calls, "b"), _Recording(calls, "c", fail_close=True)]
    )
    with pytest.raises(RuntimeError, match="a cannot close"):  # the first failure
        sinks.close()
    assert calls == ["a.close", "b.close", "c.close"]
    assert "c cannot close" in caplog.text  # the later one is logged, not lost
    sinks.close()  # idempotent, also after a failed close
    assert calls == ["a.close", "b.close", "c.close"]


def test_the_body_error_wins_over_a_failing_close(caplog):
    calls: list[str] = []
    sinks = CompositeSink([_Recording(calls, "a", fail_close=True), _Recording(calls, "b")])
    with pytest.raises(ValueError, match="body"), sinks:
        raise ValueError("body")
    assert calls == ["a.close", "b.close"]
    assert "a cannot close" in caplog.text


class _FakeWandbRun:
    name, dir = "fake", "."

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []
        self.finished = 0

    def log(self, values, step):
        self.logged.append((values, step))

    def finish(self):
        self.finished += 1


def test_real_backends_close_on_error_and_twice(tmp_path, monkeypatch):
    import wandb

    run = _FakeWandbRun()
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    cfg = _cfg(wandb={"enabled": True, "mode": "offline"})
    with pytest.raises(KeyError), MetricsSinks(tmp_path, True, cfg) as sinks:  # noqa: PT012 - as above
        assert sinks.wandb_run is run
        sinks.step(1, {"train/loss": 1.0})
        raise KeyError("body")
    assert run.finished == 1 and sinks.wandb_run is None
    sinks.close()
    sinks.close()
    assert run.finished == 1
    # Closed: TensorBoard and W&B take no more points; the jsonl files still record.
    sinks.step(2, {"train/loss": 0.5})
    assert run.logged == [({"train/loss": 1.0}, 1)]
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1]


def test_a_backend_failing_to_start_closes_those_already_started(tmp_path, monkeypatch):
    import wandb

    closed: list[bool] = []
    real_close = TensorBoardSink.close

    def close(self):
        closed.append(True)
        real_close(self)

    def broken_init(**kw):
        raise RuntimeError("down")

    monkeypatch.setattr(TensorBoardSink, "close", close)
    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.raises(ConfigError, match="down"):
        MetricsSinks(tmp_path, True, _cfg(wandb={"enabled": True, "mode": "offline"}))
    assert closed == [True]


# ------------------------------------------------------------------ TensorBoard


def test_tensorboard_step_and_epoch_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sinks = MetricsSinks(tmp_path, True, _cfg())
    for step in (10, 20):
        sinks.step(step, {"train/loss": 1.0 / step, "train/lr": step * 1e-5})
    sinks.write(ROW)
    sinks.close()

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/train_loss", "val/loss", "val/acc"} <= tags
    assert {"epoch/train_acc", "epoch/samples_per_s", "epoch/lr", "val/ap"} <= tags
    # Not numbers (monitor), the x axis itself (step), and NaN (val_auc) are not points.
    assert not tags & {"epoch/monitor", "epoch/step", "val/auc"}

    def points(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert points("train/loss") == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
    assert points("train/lr") == [(10, pytest.approx(1e-4)), (20, pytest.approx(2e-4))]
    assert points("epoch/train_loss") == [(20, pytest.approx(0.284))]
    assert points("val/acc") == [(20, pytest.approx(0.85))]
    assert points("epoch/epoch") == [(20, 1.0)]


def test_tensorboard_off(tmp_path):
    sinks = MetricsSinks(tmp_path, True, _cfg(tensorboard=False))
    sinks.step(1, {"train/loss": 1.0})
    sinks.write(ROW)
    sinks.close()
    assert not (tmp_path / "tensorboard").exists()


# ------------------------------------------------------------------ W&B


def test_wandb_offline_run_records_metrics_without_secrets(tmp_path, offline_wandb, capfd):
    run_dir = tmp_path / "run"
    cfg = _cfg(
        tensorboard=False,
        wandb={"enabled": True, "project": "p", "tags": ["t1"]},  # mode None, no key
    )
    run_config = {
        "name": "exp",
        "training": {"learning_rate": 1e-4},
        "logging": {"wandb": {"api_key": "SECRET-VALUE-1", "project": "p"}},
        "hub_token": "SECRET-VALUE-2",
    }
    start = time.perf_counter()
    sinks = MetricsSinks(run_dir, True, cfg, run_name="exp", run_config=run_config)
    init_s = time.perf_counter() - start
    assert init_s < 30, f"W&B offline init took {init_s:.1f}s"
    assert sinks.wandb_run is not None and sinks.wandb_run.name == "exp"
    sinks.step(10, {"train/loss": 0.5, "train/lr": 1e-4})
    sinks.step(20, {"train/loss": 0.4, "train/lr": 2e-4})
    sinks.write(ROW)
    sinks.close()
    sinks.close()

    records = _wait_for_wandb_records(run_dir)
    history = _wandb_history(records)
    assert history[10]["train/loss"] == pytest.approx(0.5)
    assert history[20]["train/loss"] == pytest.approx(0.4)
    assert history[20]["train/lr"] == pytest.approx(2e-4)
    assert history[20]["epoch/train_loss"] == pytest.approx(0.284)
    assert history[20]["val/acc"] == pytest.approx(0.85)
    assert "val/auc" not in history[20]  # NaN is no point

    config = _wandb_config(records)
    assert config["training"] == {"learning_rate": 1e-4}
    assert config["logging"] == {"wandb": {"project": "p"}}
    assert "hub_token" not in config
    for path in run_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"SECRET-VALUE" not in content, path
    # Silent: W&B's banners do not interleave with the console lines.
    captured = capfd.readouterr()
    assert "wandb:" not in captured.out + captured.err


@pytest.mark.parametrize(
    "key, mode, expected",
    [
        ("k" * 40, None, "online"),
        (None, None, "offline"),
        ("k" * 40, "offline", "offline"),
        (None, "online", "online"),
    ],
)
def test_wandb_mode_resolution(tmp_path, monkeypatch, key, mode, expected):
    import wandb

    calls: list[dict[str, Any]] = []

    class FakeRun:
        name, dir = "fake", str(tmp_path)

        def log(self, *a, **kw):
            pass

        def finish(self):
            calls.append({"finished": True})

    def fake_init(**kw):
        calls.append(kw)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    if key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", key)
    cfg = _cfg(tensorboard=False, wandb={"enabled": True, "mode": mode, "run_name": "named"})
    sinks = MetricsSinks(tmp_path, True, cfg, run_name="cfg-name", run_config={"x": 1})
    sinks.close()
    init, finished = calls
    assert init["mode"] == expected
    assert init["name"] == "named"
    assert init["dir"] == str(tmp_path)
    assert init["config"] == {"x": 1}
    assert key is None or key not in json.dumps(init["config"])
    assert finished == {"finished": True}


def test_wandb_disabled_does_not_init(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kw: pytest.fail("init called"))
    cfg = _cfg(tensorboard=False, wandb={"enabled": True, "mode": "disabled"})
    sinks = MetricsSinks(tmp_path, True, cfg)
    assert sinks.wandb_run is None
    sinks.close()


def test_missing_wandb_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = _cfg(wandb={"enabled": True, "mode": "offline"})
    with pytest.raises(ConfigError, match=r"pip install wandb==0\.31\.0.*enabled false"):
        MetricsSinks(tmp_path, True, cfg)


def test_redact_secrets():
    tree = {
        "a": 1,
        "API_KEY": "x",
        "n": {"db_password": "y", "keep": [{"client_secret": "z", "v": 2}]},
    }
    assert redact_secrets(tree) == {"a": 1, "n": {"keep": [{"v": 2}]}}
    assert tree["API_KEY"] == "x"  # the input is left alone


def test_wandb_init_failure_is_a_config_error(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kw):
        raise RuntimeError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = _cfg(wandb={"enabled": True, "mode": "online"})
    with pytest.raises(ConfigError, match=r"unreachable.*mode offline"):
        MetricsSinks(tmp_path, True, cfg)


# ------------------------------------------------------------------ progress bars


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    "is_main, setting, tty, expected",
    [
        (True, "auto", True, True),
        (True, "auto", False, False),
        (True, "on", False, True),
        (True, "off", True, False),
        (False, "on", True, False),
        (False, "auto", True, False),
    ],
)
def test_progress_enabled(monkeypatch, is_main, setting, tty, expected):
    monkeypatch.setattr(sys, "stderr", _Stream(tty))  # where tqdm draws
    monkeypatch.setattr(sys, "stdout", _Stream(not tty))  # not what decides
    assert progress_enabled(is_main, setting) is expected


@pytest.mark.parametrize(
    "is_main, setting, tty, expected",
    [(True, "auto", True, "bar"), (True, "auto", False, "lines"), (True, "on", False, "bar"),
     (True, "off", False, "off"), (False, "auto", False, "off")],
)  # fmt: skip
def test_without_a_terminal_rank_0_prints_lines_instead_of_the_bar(monkeypatch, is_main, setting, tty, expected):
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    assert progress_mode(is_main, setting) == expected


def test_progress_lines_come_every_log_step_after_10_s_and_at_least_every_minute(capsys, restore_logging):
    import torch

    from ds_trainer.engine import RunSettings
    from ds_trainer.hooks import ProgressLines, StepEnd

    configure_logging(0, None, debug=False)
    now = [0.0]
    settings = RunSettings(world_size=2, batch_size=8, grad_accumulation_steps=1, zero_stage=0, monitor="val_auc",
                           steps_per_epoch=100)  # fmt: skip
    lines = ProgressLines(settings, num_epochs=3, every=10, clock=lambda: now[0])
    lines.on_epoch_start(2)
    printed = []
    # 2 s per step: log steps 110, 120, ... come every 20 s; one step of 70 s (a slow batch) prints at once.
    for step in range(101, 131):
        now[0] += 70.0 if step == 125 else 2.0
        lines.on_step(StepEnd(2, step, [1e-4], torch.tensor(0.5), None))
        out = capsys.readouterr().out
        if out:
            printed.append((step, out))
    assert [step for step, _ in printed] == [110, 120, 125, 130]
    assert printed[0][1] == (
        "Epoch 2/3, step 110/300 (10/100 this epoch), loss 0.500, lr 1.00e-04, 8.0 samples/s, "
        "epoch ends in 0:03:00, 0:00:20 elapsed\n"
    )


# ------------------------------------------------------------------ logging


def test_rank1_debug_reaches_train_log_and_console(tmp_path, capsys, restore_logging):
    configure_logging(1, tmp_path, debug=True)
    configure_logging(1, tmp_path)  # debug=None keeps the earlier level
    logging.getLogger("ds_trainer.trainer").debug("shard plan for rank 1")
    text = (tmp_path / "train.log").read_text()
    assert "[rank 1] DEBUG ds_trainer.trainer: shard plan for rank 1" in text
    assert "[rank 1] shard plan for rank 1" in capsys.readouterr().out


def test_rank1_default_logs_only_warnings(tmp_path, capsys, restore_logging):
    configure_logging(1, tmp_path, debug=False)
    log = logging.getLogger("ds_trainer.trainer")
    log.info("quiet info")
    log.warning("loud warning")
    text = (tmp_path / "train.log").read_text()
    assert "quiet info" not in text
    assert "[rank 1] WARNING ds_trainer.trainer: loud warning" in text
    out = capsys.readouterr().out
    assert "quiet info" not in out and "loud warning" in out


def test_rank0_console_keeps_seed_lines(tmp_path, capsys, restore_logging):
    configure_logging(0, tmp_path, debug=False)
    MetricsSinks(None, True).write({k: v for k, v in ROW.items() if not k.startswith("val")})
    assert capsys.readouterr().out.endswith(" elapsed | Train Loss: 0.284, Train Acc: 0.869\n")
    assert "[rank 0] INFO ds_trainer.console: Epoch 1, step 20, " in (tmp_path / "train.log").read_text()


def test_rewind_forgets_what_a_resume_will_redo(tmp_path):
    sinks = MetricsSinks(tmp_path, True, _cfg())
    for step in range(1, 13):
        sinks.step(step, {"train/lr": 0.1})
    for epoch in (1, 2):
        sinks.write({**ROW, "epoch": epoch, "step": 8 * epoch})
    with (tmp_path / "steps.jsonl").open("a") as f:
        f.write('{"step": 13, "train/l')  # cut short by the crash
    sinks.rewind(epoch=1, step=8)  # resuming from epoch_1 (step 8)
    sinks.step(9, {"train/lr": 0.2})
    sinks.write({**ROW, "epoch": 2, "step": 16})
    sinks.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [*range(1, 9), 9] and steps[-1]["train/lr"] == 0.2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("train/lr")]
    assert [s for s, _ in points] == [*range(1, 9), 9] and points[-1][1] == pytest.approx(0.2)
