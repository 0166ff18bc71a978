"""scripts/reproduce_genimage.sh end to end on CPU: a GenImage-layout tree (SD v1.4 + ADM) is
sharded, the UnivFD recipe (a frozen-tower probe, whose `best` checkpoint eval once refused) trains
through launch.sh with the tiny CLIP swapped in, `best` is evaluated with the protocol and the
genimage-degraded preset, and the report puts the run beside UnivFD's published numbers."""

from __future__ import annotations

import json
import subprocess

from conftest import REPO, launch_env

SETS = (
    "model.model_name=tiny training.num_epochs=1 training.batch_size=8 training.warmup_epochs=0 "
    "data.num_workers=0 data.eval_batch_size=16 logging.tensorboard=false"
)


def test_reproduce_script_runs_end_to_end_on_cpu(tmp_path, make_tree):
    src = make_tree(
        tmp_path / "GenImage",
        {"stable_diffusion_v_1_4": {"train": (16, 16), "val": (8, 8)}, "ADM": {"val": (8, 8)}},
    )
    out = tmp_path / "out"
    env = launch_env(DS_TRAINER_CPU_RANKS="1", REPRODUCE_SET=SETS, REPRODUCE_EVAL_ARGS="--bootstrap 0")
    proc = subprocess.run(
        ["bash", "scripts/reproduce_genimage.sh", "ds_configs/recipes/univfd_vitl14_linear_probe.yaml", str(src),
         str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "shards" / "manifest.json").is_file()
    result = json.loads((out / "eval_best.json").read_text())
    assert set(result["generators"]) >= {"ADM", "stable_diffusion_v_1_4", "mean"}
    assert result["config"]["model"]["freeze_backbone"] is True
    page = (out / "report" / "report.html").read_text()
    assert "<table class='reference'" in page and "univfd_drct" in page and "<th>difference</th>" in page
    assert (out / "report" / "reference.png").is_file() and (out / "report" / "robustness.png").is_file()


def test_reproduce_script_refuses_bad_arguments(tmp_path):
    proc = subprocess.run(["bash", "scripts/reproduce_genimage.sh", "x.yaml"], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "usage: scripts/reproduce_genimage.sh RECIPE GENIMAGE_DIR [OUT]" in proc.stderr
    proc = subprocess.run(
        ["bash", "scripts/reproduce_genimage.sh", "ds_configs/recipes/coop_vitl14.yaml", str(tmp_path / "none")],
        cwd=REPO, env=launch_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 3 and "is not a directory" in proc.stderr
