"""One rank of the ds_trainer contender of vs_hf_trainer.py (started by the deepspeed launcher).

ds_trainer.Trainer trains one epoch over the saved tensors; rank 0's steps.jsonl (a unix "time" per
optimizer step) and metrics.jsonl are in --run-dir, and rank 0 copies their timings to --out.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peer.shared import build_model, load_dataset, trainer_config, worker_parser, write_json


def main() -> int:
    p = worker_parser(__doc__.split("\n\n")[0])
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument(
        "--preemption-poll",
        choices=("on", "sync", "off"),
        default="on",
        help="for preemption_poll.py: on (as shipped), sync (the former blocking all-reduce + .item() per step), "
        "off (the poll stays on this rank, no all-reduce)",
    )
    args = p.parse_args()

    import torch
    from torch.utils.data import DataLoader

    from ds_trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dataset = load_dataset(args.data, args.steps * args.batch_size * world)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=0, pin_memory=torch.cuda.is_available()
    )  # as HF's Trainer does
    trainer = Trainer(build_model(args.model_dir), loader, None,
                      config=trainer_config(args.run_dir, args.batch_size, args.zero_stage))  # fmt: skip
    poll_s = time_preemption_poll(trainer.preemption, args.preemption_poll)
    (row,) = trainer.train()
    if trainer.env is not None and trainer.env.is_main:
        run_dir = Path(args.run_dir)
        steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
        write_json(args.out, {
            "contender": "ds_trainer",
            "world_size": world,
            "step_end_time": [s["time"] for s in steps],
            "samples_per_s_epoch": row["samples_per_s"],
            "epoch_time_s": row["epoch_time_s"],
            "ds_config": json.loads((run_dir / "ds_config.json").read_text()),
            "train_loss": row["train_loss"],
            "optimizer": type(trainer.engine.optimizer).__name__,
            "param_groups": len(trainer.group_names),
            "torch_threads": torch.get_num_threads(),
            "preemption_poll": args.preemption_poll,
            "poll_s": poll_s,
            "finished": time.time(),
        })  # fmt: skip
    return 0


def time_preemption_poll(guard: Any, arm: str) -> list[float]:
    """Wall time of each of the guard's per-step polls, in the way `arm` names (see --preemption-poll)."""
    import torch
    import torch.distributed as dist

    times: list[float] = []
    shipped = guard.should_stop

    def blocking() -> bool:  # the poll before it went asynchronous
        flag = torch.tensor([guard.signum or 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=guard._group)
        guard.seen = int(flag.item()) or None
        return guard.seen is not None

    poll = {"on": shipped, "sync": blocking, "off": lambda: guard.requested}[arm]

    def timed() -> bool:
        start = time.perf_counter()
        try:
            return poll()
        finally:
            times.append(time.perf_counter() - start)

    guard.should_stop = timed
    return times


if __name__ == "__main__":
    sys.exit(main())
