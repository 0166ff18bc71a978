"""What a rank pays before its first step: py-cpuinfo asked once per machine, torch not imported to count no GPUs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, launch_env

from ds_trainer import cpu_info

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum
stepping\t: 8
cpu MHz\t\t: 2000.000
flags\t\t: fpu avx2 avx512f amx_bf16

processor\t: 1
vendor_id\t: GenuineIntel
cpu MHz\t\t: 2100.000
flags\t\t: fpu avx2 avx512f amx_bf16
"""


@pytest.mark.unit
def test_the_cache_key_is_the_cpus_identity_not_its_clock():
    key = cpu_info.identity(CPUINFO, "x86_64", 2, "9.0.0")
    assert cpu_info.identity(CPUINFO.replace("2000.000", "3100.000"), "x86_64", 2, "9.0.0") == key
    reordered = CPUINFO.replace("fpu avx2 avx512f amx_bf16", "amx_bf16 fpu avx512f avx2", 1)
    assert cpu_info.identity(reordered, "x86_64", 2, "9.0.0") == key
    # Another CPU (flags, model), machine type, core count or py-cpuinfo version: another entry.
    assert cpu_info.identity(CPUINFO.replace(" amx_bf16", "", 1), "x86_64", 2, "9.0.0") != key
    assert cpu_info.identity(CPUINFO.replace("model\t\t: 143", "model\t\t: 85"), "x86_64", 2, "9.0.0") != key
    assert cpu_info.identity(CPUINFO, "aarch64", 2, "9.0.0") != key
    assert cpu_info.identity(CPUINFO, "x86_64", 4, "9.0.0") != key
    assert cpu_info.identity(CPUINFO, "x86_64", 2, "9.0.1") != key


@pytest.fixture
def fresh_memo():
    cpu_info.forget()
    yield
    cpu_info.forget()


@pytest.mark.unit
def test_computed_once_then_read_from_the_op_directory(tmp_path, fresh_memo, monkeypatch):
    calls = []

    def compute():
        calls.append(1)
        return {"arch": "X86_64", "flags": ["avx2", "avx512f"], "count": 2}

    first = cpu_info.cached_get_cpu_info(compute, tmp_path)
    assert calls == [1] and first["flags"] == ["avx2", "avx512f"]
    (stored,) = (tmp_path / "cpuinfo").glob("*.json")
    assert json.loads(stored.read_text()) == first
    assert cpu_info.cached_get_cpu_info(compute, tmp_path) == first and calls == [1]  # memory
    cpu_info.forget()  # as a new process on the same machine
    assert cpu_info.cached_get_cpu_info(compute, tmp_path) == first and calls == [1]  # disk
    # A caller changing its copy changes nothing for the next.
    cpu_info.cached_get_cpu_info(compute, tmp_path)["flags"].append("x")
    assert cpu_info.cached_get_cpu_info(compute, tmp_path)["flags"] == ["avx2", "avx512f"]


@pytest.mark.unit
@pytest.mark.parametrize("content", ["{not json", "[]", '{"arch": "X86_64"}', ""])
def test_a_damaged_cache_file_is_recomputed_and_replaced(tmp_path, fresh_memo, content):
    cpu_info.cached_get_cpu_info(lambda: {"arch": "X86_64", "flags": ["avx2"]}, tmp_path)
    (stored,) = (tmp_path / "cpuinfo").glob("*.json")
    stored.write_text(content)
    cpu_info.forget()
    info = cpu_info.cached_get_cpu_info(lambda: {"arch": "ARM_8", "flags": ["sve"]}, tmp_path)
    assert info == {"arch": "ARM_8", "flags": ["sve"]}
    assert json.loads(stored.read_text()) == info


@pytest.mark.unit
@pytest.mark.parametrize("blocked", ["a file where the cache folder goes", "a read-only op directory"])
def test_an_unwritable_op_directory_costs_time_not_an_error(tmp_path, fresh_memo, blocked):
    if blocked.startswith("a file"):
        (tmp_path / "cpuinfo").write_text("")  # mkdir fails, for root too
    elif os.geteuid() == 0:
        pytest.skip("root writes into read-only directories (the other variant covers root)")
    else:
        tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        info = cpu_info.cached_get_cpu_info(lambda: {"arch": "X86_64", "flags": []}, tmp_path)
    finally:
        tmp_path.chmod(stat.S_IRWXU)
    assert info == {"arch": "X86_64", "flags": []} and not (tmp_path / "cpuinfo").is_dir()


def test_deepspeed_sees_the_same_answer_through_the_cache(tmp_path):
    """The patched `cpuinfo.get_cpu_info` (what DeepSpeed's op builders call) answers as py-cpuinfo does."""
    import cpuinfo

    import ds_trainer  # noqa: F401  (installs the cache)

    assert cpuinfo.get_cpu_info.__wrapped__ is not cpuinfo.get_cpu_info
    real = cpuinfo.get_cpu_info.__wrapped__()
    cached = cpuinfo.get_cpu_info()
    assert (cached["arch"], cached["flags"]) == (real["arch"], real["flags"])
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder

    assert FusedAdamBuilder().simd_width() in {
        "-D__AVX512__",
        "-D__AVX256__",
        "-D__SCALAR__",
        "-D__NEON__",
        "-D__SVE__",
    }


def _fake_python(tmp_path: Path) -> Path:
    """An interpreter for launch.sh that logs each call and acts out what launch.sh asks of it."""
    log = tmp_path / "calls.log"
    script = tmp_path / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> {log}\n'
        'case "$*" in\n'
        "  *socket*) echo 29999 ;;\n"
        "  *device_count*) echo 0 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return script


@pytest.mark.skipif(
    any(Path("/dev").glob("nvidia*")) or Path("/dev/kfd").exists(), reason="this machine has a GPU driver"
)
def test_launch_sh_does_not_import_torch_to_count_no_gpus(tmp_path):
    py = _fake_python(tmp_path)
    # launch_env: no rank or MASTER_PORT left by in-process DeepSpeed tests
    env = {k: v for k, v in launch_env().items() if not k.startswith("SLURM_")}
    env.update(DS_TRAINER_PYTHON=str(py), DS_TRAINER_CPU_RANKS="3")
    run = subprocess.run(["./launch.sh", "--config", "x.yaml"], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not any("torch" in c for c in calls), calls
    (launcher,) = [c for c in calls if "-m ds_trainer.launcher" in c]  # deepspeed's runner, behind ds_trainer's
    assert "--num_gpus 3 --master_port 29999" in launcher and launcher.endswith("launch.sh --config x.yaml")
