"""Layer 3: resume on a different world size, and stop on a signal, through ./launch.sh.

Elastic chain per ZeRO stage: A trains 2 epochs on 2 ranks; B resumes A's epoch 1 on 1 rank and
trains epochs 2-3; C resumes B's epoch 2 on 2 ranks and trains epoch 3. B's epoch 2 is compared
with A's and C's epoch 3 with B's: same global step, same LR, global batch kept by accumulation,
loss within tolerance (the data is split differently across ranks, so not to the bit).
"""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import REPO, launch_env, write_config

pytestmark = pytest.mark.distributed


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def launch(cfg, ranks, *args):
    proc = subprocess.run(
        ["./launch.sh", "--config", str(cfg), *args], cwd=REPO, env=launch_env(DS_TRAINER_CPU_RANKS=str(ranks)),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ZeRO 2 in `make test`; 1 and 3 (the same chain, other partitionings of the optimizer state) in
# `make test-slow`, which .ci/run runs too.
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_resume_on_a_different_world_size(tmp_path, tiny_shards, stage):
    def cfg(name, epochs, **training):
        return write_config(
            tmp_path / f"{name}.yaml", tiny_shards,
            # `step` makes the LR a function of the step alone (cosine would depend on num_epochs).
            training={"num_epochs": epochs, "learning_rate": 2e-3, "warmup_epochs": 0, "scheduler": "step",
                      "gamma": 0.7, "checkpoint_dir": str(tmp_path / name / "ckpt"), **training},
            deepspeed={"zero_stage": stage}, logging={"run_dir": str(tmp_path / name)},
        )  # fmt: skip

    launch(cfg("a", 2), 2)
    b = launch(cfg("b", 3), 1, "--load-dir", str(tmp_path / "a" / "ckpt" / "epoch_1"))
    # min_delta only decides what counts as a new best: a difference to report that leaves the losses alone.
    c = launch(cfg("c", 3, min_delta=1e-3), 2, "--load-dir", str(tmp_path / "b" / "ckpt" / "epoch_2"))
    a_rows, b_rows, c_rows = (jsonl(tmp_path / n / "metrics.jsonl") for n in "abc")
    assert [r["epoch"] for r in b_rows] == [2, 3] and [r["epoch"] for r in c_rows] == [3]
    # 128 images / global batch 16: 8 optimizer steps per epoch on any world size.
    assert [r["step"] for r in a_rows] == [8, 16] and [r["step"] for r in b_rows] == [16, 24]
    assert c_rows[0]["step"] == 24
    assert b_rows[0]["lr"] == pytest.approx(a_rows[1]["lr"], rel=1e-9) == 2e-3 * 0.7**2
    assert c_rows[0]["lr"] == pytest.approx(b_rows[1]["lr"], rel=1e-9)
    assert b_rows[0]["train_loss"] == pytest.approx(a_rows[1]["train_loss"], rel=0.15)
    assert c_rows[0]["train_loss"] == pytest.approx(b_rows[1]["train_loss"], rel=0.15)
    ds_b = json.loads((tmp_path / "b" / "ds_config.json").read_text())
    ds_c = json.loads((tmp_path / "c" / "ds_config.json").read_text())
    assert (ds_b["gradient_accumulation_steps"], ds_b["train_batch_size"]) == (2, 16)
    assert ds_b["checkpoint"] == {"load_universal": True}
    assert (ds_c["gradient_accumulation_steps"], ds_c["train_batch_size"]) == (1, 16)
    b_out, c_out = b.stdout + b.stderr, c.stdout + c.stderr
    assert "a 2-rank checkpoint on 1 rank: grad_accumulation_steps 2 (config: 1) keeps the global batch 16" in b_out
    # Another world size and more epochs are what the resume is for, not config differences.
    assert "config differs" not in b_out
    assert (tmp_path / "a" / "ckpt" / "epoch_1" / "universal" / "ds_trainer.json").is_file()  # cached
    assert "on 2 ranks: grad_accumulation_steps 1 (config: 1) keeps the global batch 16" in c_out
    # A real difference: named with both values, once (rank 0), not once per rank.
    assert c_out.count("config differs from the checkpoint's: training.min_delta 0.0 -> 0.001; continuing") == 1
    assert "config differs" not in c_out.replace("config differs from the checkpoint's: training.min_delta", "", 1)


# make test-slow: the refusal itself is in make test (tests/test_refusals.py, indivisible-world); this is it after a real 2-rank save
@pytest.mark.slow
def test_indivisible_global_batch_is_refused_with_the_numbers(tmp_path, tiny_shards):
    cfg = write_config(
        tmp_path / "a.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0}, deepspeed={"zero_stage": 1}
    )
    launch(cfg, 2)
    proc = subprocess.run(
        ["./launch.sh", "--config", str(cfg), "--load-dir", str(tmp_path / "ckpt"), "--set", "training.batch_size=6",
         "--set", "training.num_epochs=2"],
        cwd=REPO, env=launch_env(DS_TRAINER_CPU_RANKS="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "global batch of 16 (8 x 1 accumulation x 2 ranks)" in out and "2.66667 accumulation steps" in out


def test_preemption_signal_saves_at_a_step_and_resume_continues(tmp_path, tiny_shards):
    cfg = write_config(
        tmp_path / "cfg.yaml", tiny_shards,
        training={"num_epochs": 40, "warmup_epochs": 0, "scheduler": "none", "save_frequency": 0},
        deepspeed={"zero_stage": 2}, logging={"log_every_n_steps": 1}, data={"num_workers": 2},
    )  # fmt: skip
    env = launch_env(DS_TRAINER_CPU_RANKS="2")
    proc = subprocess.Popen(
        ["./launch.sh", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    steps_file = tmp_path / "run" / "steps.jsonl"
    deadline = time.time() + 300
    while len(jsonl(steps_file)) < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    # SLURM's pre-timeout signal goes to every task; here: to both ranks (the launcher's children).
    ranks = _rank_pids(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGUSR1)  # one rank is enough: the ranks agree at the next step
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    # Information, said once (rank 0), not an error on every rank.
    assert out.count("SIGUSR1 received: saved") == 1 and "ds-trainer train: error" not in out, out[-3000:]
    ckpt = tmp_path / "ckpt"
    tag = (ckpt / "latest").read_text()
    assert tag.startswith("step_")
    state = json.loads((ckpt / tag / "ds_trainer.json").read_text())
    step = state["global_step"]
    assert step == int(tag.split("_")[1]) and step >= 12
    # batches_done 8: stopped at the epoch's last batch, which the resume finishes (row, checkpoint)
    assert state["epoch"] * 8 + state["batches_done"] == step and 1 <= state["batches_done"] <= 8
    # The marker train.sbatch requeues on (srun's exit code may say 143 for a rank it ended).
    assert json.loads((ckpt / "PREEMPTED").read_text())["tag"] == tag
    # Resume: the next logged step is the one after the saved one, and the epochs end at their usual steps.
    epochs = state["epoch"] + 2
    resumed = subprocess.run(
        ["./launch.sh", "--config", str(cfg), "--load-dir", str(ckpt), "--set", f"training.num_epochs={epochs}",
         "--set", f"logging.run_dir={tmp_path / 'run2'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not (ckpt / "PREEMPTED").exists()
    after = jsonl(tmp_path / "run2" / "steps.jsonl")
    assert after[0]["step"] == step + 1 and after[-1]["step"] == epochs * 8
    rows = jsonl(tmp_path / "run2" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [state["epoch"] + 1, epochs]
    # Exact data position (2 ranks x 2 workers): the resumed steps see the very batches an
    # uninterrupted run sees, so their losses match it step for step.
    reference = subprocess.run(
        ["./launch.sh", "--config", str(cfg), "--set", f"training.num_epochs={epochs}",
         "--set", f"logging.run_dir={tmp_path / 'ref'}", "--set", f"training.checkpoint_dir={tmp_path / 'ref_ckpt'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    want = {r["step"]: r["train/loss"] for r in jsonl(tmp_path / "ref" / "steps.jsonl")}
    for r in after:
        assert r["train/loss"] == pytest.approx(want[r["step"]], rel=1e-4, abs=1e-6), r["step"]
    # The interrupted epoch's row covers its batches from before the preemption too (all ranks).
    ref_rows = {r["epoch"]: r for r in jsonl(tmp_path / "ref" / "metrics.jsonl")}
    assert rows[0]["train_loss"] == pytest.approx(ref_rows[state["epoch"] + 1]["train_loss"], rel=1e-4)
    assert rows[0]["train_acc"] == pytest.approx(ref_rows[state["epoch"] + 1]["train_acc"])


def _rank_pids(launcher_pid):
    """PIDs of the processes running `launch.sh --local_rank=N` under the launcher."""
    import psutil

    found = []
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            rank = any(a.startswith("--local_rank=") for a in p.cmdline())
            # DataLoader workers are forks of a rank, with the same command line.
            if rank and not any(a.startswith("--local_rank=") for a in p.parent().cmdline()):
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(found)
