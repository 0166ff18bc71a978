"""Two "nodes" through the deepspeed launcher's hostfile, on loopback: one launcher per node with --no_ssh.

Both hostfile entries (localhost, 127.0.0.1) are this machine; each launcher is told its --node_rank
and starts that node's one rank, and the ranks meet at 127.0.0.1 as they would at node 0's address.
"""

import json
import socket
import subprocess

import pytest
from conftest import REPO, launch_env, write_config

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# make test-slow: two launchers as two hostfile nodes (~30 s); make test's launches are one node
@pytest.mark.slow
def test_hostfile_two_nodes_without_ssh_train_as_one_world(tmp_path, tiny_shards):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(_free_port())
    # One core per rank: the two launchers cannot see each other's ranks to share the CPU.
    # The launcher's INFO lines (quiet by default) say what world each node's launcher joined.
    env = launch_env(OMP_NUM_THREADS="1", DS_LAUNCHER_ARGS="--log_level info")
    launcher = ["--hostfile", str(hostfile), "--no_ssh", "--master_addr", "127.0.0.1", "--master_port", port]
    nodes = [
        subprocess.Popen(
            ["./launch.sh", *launcher, "--node_rank", str(node), "--", "--config", str(cfg)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "dist_world_size=2" in outs[0] and "dist_world_size=2" in outs[1]
    # Global rank 0 (node 0) alone logs and writes metrics: one row per epoch, not one per node.
    assert "world size 2" in outs[0] and "world size 2" not in outs[1]
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["epoch"] == 1 and row["step"] == 8 and row["val_samples"] == 48  # 128 / (2 ranks x 8)
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["train_batch_size"] == 16
    state = json.loads((tmp_path / "ckpt" / "epoch_1" / "ds_trainer.json").read_text())
    assert (state["world_size"], state["global_step"]) == (2, 8)
