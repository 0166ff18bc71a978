"""Smoke tests of the GPU suite's parts on this CPU, of its wheels folder and of RESULTS.md's rendering.

The suite itself needs a CUDA GPU (benchmarks/gpu_suite.sh); here gpu_bench.py runs its tiny model
on the CPU so that the code path (model from a config, both loaders, MFU, memory) is exercised, the
refusal without a GPU is checked (one line, nothing written), and the wheels folder that
benchmarks/gpu_wheels.sh builds is checked against what the GPU machine lacks.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cmd

from benchmarks import gpu_env

WHEELS = REPO / "benchmarks" / "gpu_wheels"

# The benchmark scripts start and write their results (make test-bench; .ci/run runs it after make test).
pytestmark = pytest.mark.bench


def test_gpu_bench_runs_both_loaders_on_cpu(tmp_path):
    out = tmp_path / "gpu_suite.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--models", "tiny", "--loaders",
                    "memory,stream", "--steps", "2", "--skip", "1", "--cpu", "--workers", "1", "--out", str(out)],
                   timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["loader"]) for r in rows] == [("tiny", "memory"), ("tiny", "stream")]
    for r in rows:
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["gflop_per_image"] > 0
        assert r["peak_memory_gib"] > 0 and r["peak_memory_kind"] == "peak RSS" and r["precision"] == "fp32"
    assert "| tiny CLIP | stream |" in result["markdown"]
    assert result["summary"].startswith("tiny CLIP memory")


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is checked where there is no GPU")


def _one_line_refusal(proc, expected: str) -> None:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in proc.stderr


@no_gpu
def test_gpu_suite_refuses_without_a_gpu():
    proc = run_cmd(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], timeout=120, PYTHON=sys.executable)
    _one_line_refusal(proc, "sees no CUDA GPU")


@no_gpu
@pytest.mark.parametrize("how", ["--out", "--out=", "RESULTS_DIR"])
def test_gpu_suite_refusal_writes_nothing_into_the_results_folder(tmp_path, how):
    results = tmp_path / "results" / "gpu"
    env = {"PYTHON": sys.executable}
    if how == "RESULTS_DIR":
        args, env["RESULTS_DIR"] = [], str(results)
    else:
        args = ["--out", str(results)] if how == "--out" else [f"--out={results}"]
    proc = run_cmd(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), *args], timeout=120, **env)
    _one_line_refusal(proc, "sees no CUDA GPU")
    assert not (tmp_path / "results").exists()


def test_gpu_suite_without_torch_refuses_in_one_line(tmp_path):
    python = tmp_path / "python"  # this interpreter without its site-packages: no torch
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    proc = run_cmd(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--out", str(tmp_path / "r")], timeout=60,
                   PYTHON=str(python))  # fmt: skip
    _one_line_refusal(proc, "cannot import torch")
    assert not (tmp_path / "r").exists()


def test_gpu_suite_refuses_an_unknown_argument():
    proc = run_cmd(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--bogus"], timeout=60, PYTHON=sys.executable)
    _one_line_refusal(proc, "unknown argument --bogus")


def test_gpu_suite_caps_sum_under_eight_minutes():
    """Every Python run in gpu_suite.sh is under `timeout`; the caps (+2 s kill-after each) sum under 480 s."""
    import re

    text = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    runs = [ln for ln in code if re.search(r'"\$PY" (benchmarks/|"\$@")', ln)]
    assert runs and all("timeout --kill-after=2 " in ln for ln in runs), runs
    caps = [int(c) for ln in runs for c in re.findall(r"timeout --kill-after=2 (\d+) ", ln)]
    caps += [int(m.group(1)) for ln in code if (m := re.match(r"step (\d+) ", ln))]
    assert len(caps) == 8, caps  # GPU check, install, import check, 4 parts, RESULTS.md
    assert sum(caps) + 2 * len(caps) < 480, caps


def test_gpu_bench_keeps_finished_rows_and_caps_each_run(tmp_path):
    """--row-timeout stops a run that overruns; the JSON, rewritten after each run, lists every one."""
    out = tmp_path / "gpu_suite.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--models", "tiny", "--loaders",
                    "memory,stream", "--steps", "2", "--skip", "1", "--cpu", "--workers", "1", "--row-timeout", "1",
                    "--out", str(out)], timeout=200)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["planned_runs"] == 2 and [(r["loader"], r["error"]) for r in result["rows"]] == [
        ("memory", "over its 1 s cap (--row-timeout)"),
        ("stream", "over its 1 s cap (--row-timeout)"),
    ]
    assert "| tiny CLIP | memory | 8 | failed: over its 1 s cap" in result["markdown"]
    assert result["summary"] == "all runs failed"


def test_step_overhead_runs_the_suites_bf16_setting(tmp_path):
    """The suite's step_overhead part: bf16 and torch's fused AdamW (here on the CPU, tiny)."""
    out = tmp_path / "step_overhead_gpu.json"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "step_overhead.py"), "--steps", "2", "--repeats", "1",
                    "--hidden", "64", "--layers", "1", "--image-size", "32", "--batch-size", "4", "--cpu",
                    "--precision", "bf16", "--torch-adam", "--zero-stage", "2", "--out", str(out)],
                   timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["precision"] == "bf16" and result["settings"]["zero_stage"] == 2
    assert result["ds_optimizer"]["params"]["torch_adam"] is True and result["ds_optimizer"]["params"]["fused"]
    assert all(result["raw"][k][0] > 0 for k in ("trainer", "engine", "torch"))
    assert "ZeRO 2, bf16, optimizer torch fused AdamW" in result["markdown"]
    assert "torch.autocast(bfloat16)" in result["markdown"]


# --- the wheels the GPU machine lacks -------------------------------------------------------------------

SUITE_SCRIPTS = ["gpu_bench.py", "data_throughput.py", "step_overhead.py", "speed_switches.py", "write_results.py",
                 "common.py", "gpu_env.py"]  # fmt: skip


def _third_party(tree: ast.AST, module_level_only: bool) -> set[str]:
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    local = {"ds_trainer", "benchmarks", "common", "data_throughput", "step_overhead", "gpu_env", "conftest"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def test_suite_modules_cover_what_the_suite_imports():
    """gpu_env.SUITE_MODULES (what the wheels plan starts from) lists every third-party module that the
    suite's scripts import anywhere, and that ds_trainer imports at module level."""
    seen = set()
    for name in SUITE_SCRIPTS:
        seen |= _third_party(ast.parse((REPO / "benchmarks" / name).read_text()), module_level_only=False)
    for path in (REPO / "ds_trainer").rglob("*.py"):
        seen |= _third_party(ast.parse(path.read_text()), module_level_only=True)
    seen -= {"packaging"}  # gpu_env's own, imported lazily; a dependency of torch and deepspeed
    assert seen <= set(gpu_env.SUITE_MODULES), sorted(seen - set(gpu_env.SUITE_MODULES))


def test_wheel_plan_follows_what_the_machine_lacks():
    machine = gpu_env.gpu_machine_packages()
    assert machine["torch"] == "2.11.0" and "deepspeed" not in machine and "pydantic" not in machine
    plan = {i["dist"]: i for i in gpu_env.plan(machine)}
    pins = gpu_env.requirement_pins()
    for dist in ("deepspeed", "pydantic", "webdataset"):
        assert plan[dist]["role"] == "missing" and plan[dist]["version"] == pins[dist]
    for dist in ("pydantic-core", "braceexpand", "hjson", "annotated-types", "typing-inspection"):
        assert plan[dist]["role"] == "missing" and plan[dist]["why"].startswith("required by")
    assert not {d for d, i in plan.items() if i["role"] == "missing"} & set(machine)
    # A machine without msgpack gets it carried (deepspeed needs it); one with a new enough
    # typing-extensions keeps its own; one with an old one gets the newer wheel.
    lacking = {k: v for k, v in machine.items() if k != "msgpack"}
    assert {i["dist"] for i in gpu_env.plan(lacking)} - set(plan) == {"msgpack"}
    assert "typing-extensions" not in {i["dist"] for i in gpu_env.plan({**machine, "typing-extensions": "9.0"})}
    old = {i["dist"]: i for i in gpu_env.plan({**machine, "typing-extensions": "4.0.0"})}
    assert old["typing-extensions"]["role"] == "newer" and "4.0.0" in old["typing-extensions"]["why"]


def test_install_chooses_missing_wheels_and_newer_ones_only_over_older_copies():
    items = [{"dist": "deepspeed", "version": "0.19.8", "role": "missing"},
             {"dist": "typing-extensions", "version": "4.16.0", "role": "newer"}]  # fmt: skip
    pick = lambda have: [i["dist"] for i in gpu_env.choose(items, have)]  # noqa: E731
    assert pick({"deepspeed": None, "typing-extensions": "4.20.0"}) == ["deepspeed"]
    assert pick({"deepspeed": "0.15.0", "typing-extensions": "4.16.0"}) == ["deepspeed"]
    assert pick({"deepspeed": None, "typing-extensions": "4.12.2"}) == ["deepspeed", "typing-extensions"]
    assert pick({"deepspeed": None, "typing-extensions": None}) == ["deepspeed", "typing-extensions"]


def test_wheel_tags_match_the_gpu_machine():
    fits = gpu_env.wheel_fits
    assert fits(Path("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"))
    assert fits(Path("deepspeed-0.19.8-py3-none-any.whl")) and fits(Path("x-1.0-cp38-abi3-manylinux_2_28_x86_64.whl"))
    assert not fits(Path("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl"))
    assert not fits(Path("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_aarch64.whl"))
    assert not fits(Path("pydantic_core-2.50.5-cp312-cp312-macosx_11_0_arm64.whl"))


built = pytest.mark.skipif(not (WHEELS / "manifest.json").is_file(),
                           reason="benchmarks/gpu_wheels/ not built here: run bash benchmarks/gpu_wheels.sh")  # fmt: skip


@built
def test_wheels_folder_covers_what_the_gpu_machine_lacks(tmp_path):
    """The dry run of the GPU suite's install: the folder's manifest covers every distribution the suite
    imports (and their needs) that the GPU machine lacks, at the pins; the files match their sha256; pip
    installs them all as for CPython 3.12 manylinux x86_64; deepspeed's wheel is pure Python."""
    assert gpu_env.covers(WHEELS) == []
    manifest = gpu_env.read_manifest(WHEELS)
    items = gpu_env.verify(WHEELS)
    assert manifest["total_mib"] < gpu_env.MAX_MIB
    assert sum((WHEELS / i["file"]).stat().st_size for i in items) / 2**20 < gpu_env.MAX_MIB
    by_dist = {i["dist"]: i for i in items}
    assert by_dist["deepspeed"]["file"].endswith("-py3-none-any.whl") and "sdist" in by_dist["deepspeed"]["built_from"]
    gpu_env.check_pure(WHEELS / by_dist["deepspeed"]["file"])
    assert all(gpu_env.wheel_fits(WHEELS / i["file"]) for i in items)
    result = gpu_env.install(WHEELS, tmp_path / "site", dry_run=True)
    assert result["installed"] == {i["dist"]: i["version"] for i in items}
    assert (tmp_path / "site" / "deepspeed" / "__init__.py").is_file()
    assert list((tmp_path / "site" / "pydantic_core").glob("*cpython-312-x86_64-linux-gnu.so"))


@built
def test_a_changed_wheel_is_refused(tmp_path):
    import shutil

    copy = tmp_path / "wheels"
    shutil.copytree(WHEELS, copy)
    victim = copy / json.loads((copy / "manifest.json").read_text())["wheels"][0]["file"]
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(SystemExit, match="does not match its sha256"):
        gpu_env.verify(copy)
    os.remove(victim)
    with pytest.raises(SystemExit, match="missing; rerun bash benchmarks/gpu_wheels.sh"):
        gpu_env.verify(copy)


def test_results_md_is_rendered_from_the_result_files(tmp_path):
    results, notes = tmp_path / "results", tmp_path / "notes"
    results.mkdir()
    notes.mkdir()
    (results / "step_overhead.json").write_text(json.dumps({
        "command": "python benchmarks/step_overhead.py", "date": "2026-11-30", "summary": "trainer/engine 1.01",
        "markdown": "| a | b |\n|---|---|\n| 1 | 2 |", "machine": {"processor": "Some CPU", "cpus": 2, "torch": "2.13.0"},
    }))  # fmt: skip
    (notes / "step_overhead.md").write_text("Profile: nothing left.")
    (results / "gpu_env.json").write_text(json.dumps({"install": {"installed": {"deepspeed": "0.19.8"}}}))
    out = tmp_path / "RESULTS.md"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "write_results.py"), "--results", str(results),
                    "--notes", str(notes), "--out", str(out)], timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    section = text.split("## 1. Trainer overhead and MFU")[1].split("## 2.")[0]
    assert "`python benchmarks/step_overhead.py` — 2026-11-30, Some CPU, 2 cores" in section
    assert "**trainer/engine 1.01**" in section and "| 1 | 2 |" in section and "Profile: nothing left." in section
    # A benchmark without a result is listed as not run, with the reason.
    assert "## 8. GPU suite" in text and "not run: no GPU has been lent" in text
    assert "## 8b. GPU: Trainer overhead in bf16 (`gpu_suite.sh` part 3)\n\n_not run on a GPU yet._" in text
    assert "## 5. Memory per ZeRO stage\n\n_run `make bench`._" in text
    assert "gpu_env" not in text  # what the suite installed is no benchmark's section
