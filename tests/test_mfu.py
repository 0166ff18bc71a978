"""MFU, samples/s and data-wait accounting, and model.compile: pure pieces, then the Trainer in one process.

The 2-rank run in test_launch_features.py checks the same fields under the launcher.
"""

import json
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from ds_trainer import CLIPModel, Trainer
from ds_trainer.flops import FlopTally, MfuMeter, PeakFlops, gpu_peak_flops, measure_matmul_flops, peak_flops


def test_flop_tally_counts_forward_and_backward_of_a_linear_layer_exactly():
    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    tally = FlopTally()
    with tally.count():
        y = layer(x).sum()
    assert tally.total == 2 * 8 * 32 * 16  # forward: one matmul
    with tally.count():
        y.backward()
    # backward: grad of the input and grad of the weight, one matmul each
    assert tally.total == 3 * 2 * 8 * 32 * 16


def test_gpu_table_and_configured_peak():
    assert gpu_peak_flops("NVIDIA H200", torch.bfloat16) == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == pytest.approx(756e12)
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.float16) == pytest.approx(312e12)
    assert gpu_peak_flops("Some Future GPU", torch.bfloat16) is None
    configured = peak_flops(torch.device("cpu"), torch.float32, 2.5)
    assert configured.per_device == pytest.approx(2.5e12) and "configured" in configured.source


def test_cpu_peak_is_a_measured_matmul_rate():
    rate = measure_matmul_flops(torch.device("cpu"), torch.float32, n=256, seconds=0.05)
    assert 1e8 < rate < 1e14  # a real number of FLOP/s for a CPU, not a placeholder
    measured = peak_flops(torch.device("cpu"), torch.float32, None)
    assert measured.per_device > 1e8 and measured.source.startswith("measured 1024x1024 float32 matmul")


@pytest.mark.unit
def test_the_peak_line_shows_a_cpu_sized_peak(caplog):
    # A CPU's measured peak is tens of GFLOP/s: "0.0 TFLOP/s" (%.1f) read as if nothing was measured.
    caplog.set_level("INFO", logger="ds_trainer.flops")
    MfuMeter.for_device(torch.device("cpu"), torch.float32, 0.0412, world_size=1)
    assert "mfu: peak 0.0412 TFLOP/s per device (configured" in caplog.text


def test_mfu_meter_arithmetic():
    meter = MfuMeter(PeakFlops(1e12, "t"), world_size=2)
    assert meter.mfu(100, 1.0) is None  # before the FLOPs are counted
    meter.flops_per_sample = 1e9
    # 100 samples x 1 GFLOP in 1 s = 0.1 TFLOP/s of 2 x 1 TFLOP/s
    assert meter.mfu(100, 1.0) == pytest.approx(0.05)
    assert meter.achieved_tflops(100, 1.0) == pytest.approx(0.1)
    assert meter.mfu(100, 0.0) is None


class SlowLoader:
    """A DataLoader whose every batch takes `delay` seconds to arrive: the loop must wait for it."""

    def __init__(self, loader, delay):
        self.loader, self.delay = loader, delay
        self.batch_size = loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def _trainer(tmp_path, name, train_loader, **kwargs):
    torch.manual_seed(0)
    model = CLIPModel(model_name="tiny", mode="fine-tune")
    args = dict(num_epochs=1, device="cpu", learning_rate=1e-4, save_frequency=0, warmup_epochs=0,
                checkpoint_dir=str(tmp_path / name / "ckpt"), run_dir=tmp_path / name)  # fmt: skip
    args.update(kwargs)
    return Trainer(model=model, train_loader=train_loader, **args)


def _dataset(n=24):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 224, 224, generator=g), torch.arange(n) % 2)


def test_trainer_logs_mfu_rates_and_data_wait(tmp_path):
    slow = SlowLoader(DataLoader(_dataset(), batch_size=4), delay=0.0)
    trainer = _trainer(tmp_path, "fast", slow)
    trainer.cfg.logging.log_every_n_steps = 2
    (row,) = trainer.train()
    # The FLOPs per sample counted at the first step are the model's forward + backward, per sample.
    model = CLIPModel(model_name="tiny", mode="fine-tune")
    x = torch.randn(4, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x).float(), torch.tensor([0, 1, 0, 1])).backward()
    assert trainer.mfu.flops_per_sample == pytest.approx(counter.get_total_flops() / 4)
    assert 0 < row["mfu"] < 1 and row["train_tflops"] > 0
    assert row["mfu"] == pytest.approx(row["train_tflops"] * 1e12 / trainer.mfu.peak.per_device)
    assert 0 <= row["data_wait_fraction"] < 0.5
    steps = [json.loads(line) for line in (tmp_path / "fast" / "steps.jsonl").read_text().splitlines()]
    logged = [s for s in steps if "train/loss" in s]
    assert [s["step"] for s in logged] == [2, 4, 6]
    assert all(s["train/samples_per_s"] > 0 and 0 < s["train/mfu"] < 1 for s in logged)

    # A loader that is the bottleneck shows in data_wait_fraction (each batch sleeps 0.4 s; a tiny step is faster).
    slow = SlowLoader(DataLoader(_dataset(), batch_size=4), delay=0.4)
    (slow_row,) = _trainer(tmp_path, "slow", slow).train()
    assert slow_row["data_wait_s"] >= 6 * 0.4 * 0.9
    assert slow_row["data_wait_fraction"] > 0.5 > row["data_wait_fraction"]


def test_mfu_can_be_turned_off(tmp_path):
    trainer = _trainer(tmp_path, "off", DataLoader(_dataset(8), batch_size=4))
    trainer.cfg.logging.log_every_n_steps = 1
    trainer.cfg.logging.mfu = False
    (row,) = trainer.train()
    assert trainer.mfu is None and "mfu" not in row and "data_wait_fraction" in row
    steps = [json.loads(line) for line in (tmp_path / "off" / "steps.jsonl").read_text().splitlines()]
    assert steps and all("train/mfu" not in s and s["train/samples_per_s"] > 0 for s in steps)


def test_compiled_model_trains_and_saves_plain_keys(tmp_path):
    trainer = _trainer(tmp_path, "compiled", DataLoader(_dataset(16), batch_size=4))
    trainer.cfg.model.compile = True
    (row,) = trainer.train()
    assert trainer.engine.is_compiled
    assert row["train_loss"] == pytest.approx(row["train_loss"]) and row["mfu"] > 0  # finite, counted
    # nn.Module.compile() in place: checkpoints keep the plain parameter names (no _orig_mod.).
    from ds_trainer.consolidate import consolidated_state_dict, resolve_source

    weights = consolidated_state_dict(resolve_source(tmp_path / "compiled" / "ckpt"), CLIPModel(model_name="tiny"))
    assert weights and not any("_orig_mod" in k for k in weights)
    assert set(weights) == set(CLIPModel(model_name="tiny").state_dict())
