"""The preemption poll's asynchronous all-reduce: every rank stops at the same step, one step late at most.

Two gloo ranks (torch.multiprocessing, no DeepSpeed) drive PreemptionGuard.should_stop as the
training loop does after each optimizer step, with a signal arriving on one rank only.
"""

from __future__ import annotations

import json
import signal

import torch.multiprocessing as mp

from ds_trainer.distributed import _free_port


def _rank(rank: int, world: int, port: int, signal_at: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from ds_trainer.preemption import PreemptionGuard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        guard = PreemptionGuard()
        answers, settled = [], None
        with guard.installed():
            for step in range(steps):
                if rank == 1 and step == signal_at:
                    guard.signum = int(signal.SIGUSR1)  # as the handler sets it, on this rank alone
                answers.append(guard.should_stop())
                if answers[-1]:
                    break
            else:
                settled = guard.settle()  # the epoch's end: the last poll, still in flight, is read
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"answers": answers, "settled": settled, "seen": guard.seen}, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, signal_at: int, steps: int) -> list[dict]:
    out = str(tmp_path / "poll")
    mp.spawn(_rank, args=(2, _free_port(), signal_at, steps, out), nprocs=2, join=True)
    return [json.loads((tmp_path / f"poll.{r}").read_text()) for r in range(2)]


def test_both_ranks_stop_at_the_step_after_one_ranks_signal(tmp_path):
    ranks = _run(tmp_path, signal_at=2, steps=8)
    # The flag of step 2's poll is read at step 3's: both ranks answer yes there, and not before.
    assert ranks[0]["answers"] == ranks[1]["answers"] == [False, False, False, True]
    assert ranks[0]["seen"] == ranks[1]["seen"] == int(signal.SIGUSR1)  # rank 0 can name rank 1's signal


def test_a_signal_at_the_epochs_last_step_is_read_at_its_end(tmp_path):
    ranks = _run(tmp_path, signal_at=4, steps=5)
    assert ranks[0]["answers"] == ranks[1]["answers"] == [False] * 5
    assert ranks[0]["settled"] is ranks[1]["settled"] is True
    assert ranks[0]["seen"] == int(signal.SIGUSR1)


def test_no_signal_means_no_stop_and_an_empty_settle(tmp_path):
    ranks = _run(tmp_path, signal_at=-1, steps=4)
    assert all(r["answers"] == [False] * 4 and r["settled"] is False and r["seen"] is None for r in ranks)
