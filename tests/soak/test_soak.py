"""The soak (`make soak`, not in `make test`; at most 10 minutes): a 2-rank run whose ranks are
SIGKILLed at random steps several times, resumed with --load-dir each time, must end with a
continuous history (every epoch once in metrics.jsonl, every optimizer step once in steps.jsonl)
and the exact step count of an uninterrupted run.

SOAK_SEED picks the kills (printed, so a failure can be replayed); SOAK_KILLS how many (default 4).
"""

from __future__ import annotations

import json
import os
import random
import re
import time

from conftest import run_cmd, write_config

from ds_trainer.checkpoint import LATEST, MARKER

DEADLINE_S = 600
EPOCHS, STEPS_PER_EPOCH = 5, 8  # 128 train images / (2 ranks x batch 8)


def test_random_kills_and_resumes_leave_an_exact_history(tmp_path, tiny_shards):
    seed = int(os.environ.get("SOAK_SEED", time.time_ns() % 100_000))
    kills_left = int(os.environ.get("SOAK_KILLS", "4"))
    rng = random.Random(seed)
    print(f"soak seed {seed}")
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_shards,
        training={"num_epochs": EPOCHS, "warmup_epochs": 1},
        logging={"log_every_n_steps": 1},
    )
    ckpt, total = tmp_path / "ckpt", EPOCHS * STEPS_PER_EPOCH
    start, launches, kills = time.monotonic(), 0, []
    while True:
        assert time.monotonic() - start < DEADLINE_S, f"soak over {DEADLINE_S} s (seed {seed}, kills {kills})"
        done = (
            json.loads((ckpt / (ckpt / LATEST).read_text() / MARKER).read_text())["global_step"]
            if (ckpt / LATEST).is_file()
            else 0
        )
        if done == total:
            break
        env = {"DS_TRAINER_CPU_RANKS": "2"}
        fault = None
        if kills_left:
            step, rank = rng.randint(done + 1, min(done + 2 * STEPS_PER_EPOCH, total)), rng.randint(0, 1)
            fault = f"kill after step {step} on rank {rank}"
            env["DS_TRAINER_FAULT"] = f"kill:step={step}:rank={rank}"
        args = ["--load-dir", str(ckpt)] if (ckpt / LATEST).is_file() else []
        out = run_cmd(["./launch.sh", "--config", str(cfg), *args], **env)
        launches += 1
        text = out.stdout + out.stderr
        if fault:
            kills_left -= 1
            kills.append(fault)
            assert out.returncode != 0 and fault in text, f"seed {seed}: {fault} did not happen\n{text[-3000:]}"
        else:
            assert out.returncode == 0, f"seed {seed}\n{text[-3000:]}"
        if args:
            assert "resumed from" in text

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)), f"seed {seed}, kills {kills}"
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1)), f"seed {seed}, kills {kills}: steps.jsonl not continuous"
    assert not re.search(r"Traceback", (tmp_path / "run" / "metrics.jsonl").read_text())
    print(f"soak: {len(kills)} kills ({'; '.join(kills)}), {launches} launches, {time.monotonic() - start:.0f} s")
