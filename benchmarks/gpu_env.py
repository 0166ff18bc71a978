"""The GPU suite's Python environment on a GPU machine that has torch but not the rest, and no network.

The project's GPU machine (`gpu_machine_packages.txt`: Python 3.12, torch 2.11, CUDA 13) lacks
deepspeed, webdataset, pydantic and a few of their needs. This module works out which distributions
must travel there as wheels, fetches them (here, where PyPI is reachable), and installs them there
into a folder put on PYTHONPATH, so the machine's own torch and transformers are used.

    python benchmarks/gpu_env.py plan                       # what must travel, and why (reads this env)
    python benchmarks/gpu_env.py fetch --out benchmarks/gpu_wheels      # bash benchmarks/gpu_wheels.sh
    python benchmarks/gpu_env.py install --wheels benchmarks/gpu_wheels --target /tmp/site [--dry-run]
    python benchmarks/gpu_env.py gpu                        # exit 2 with one line when no CUDA GPU
    python benchmarks/gpu_env.py check                      # import what the suite imports, or exit 2

The plan starts from the distributions behind SUITE_MODULES (in this environment, which has every
dependency) and follows their requirements (Python 3.12, Linux x86_64, no extras) through every
distribution the GPU machine lacks. Each of those travels (`role: missing`) at requirements.txt's pin,
else this environment's (tested) version. A distribution the machine has but that a travelling one
needs at a version the machine may not have (its version unknown, or known and too old) travels too
(`role: newer`), and is installed there only when the machine's own is older.

Only the standard library is imported at module level: `gpu` must answer on any Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGES_FILE = HERE / "gpu_machine_packages.txt"
MANIFEST = "manifest.json"
MAX_MIB = 60.0  # the device tool carries 64 MiB in all, the repository included

# Every third-party top-level module the suite's scripts import (benchmarks/gpu_bench.py,
# data_throughput.py, step_overhead.py, speed_switches.py, write_results.py, common.py) or that
# ds_trainer imports at module level; tests/test_bench_gpu_suite.py checks this list against their code.
SUITE_MODULES = ("torch", "deepspeed", "transformers", "safetensors", "webdataset", "pydantic", "yaml", "PIL",
                 "numpy", "tqdm", "cpuinfo", "sklearn", "tensorboard")  # fmt: skip

# The GPU machine: CPython 3.12 on Linux x86_64 (glibc 2.39: Ubuntu 24.04's Python 3.12.3).
TARGET_PYTHON = (3, 12)
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip
# Built here from its sdist with no ops (DS_BUILD_OPS=0): pure Python; DeepSpeed JIT-builds ops there.
BUILT_FROM_SDIST = {"deepspeed": {"DS_BUILD_OPS": "0"}}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_machine_packages(path: Path = PACKAGES_FILE) -> dict[str, str | None]:
    """{canonical name: version or None} of the GPU machine's Python packages."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version or None
    return out


def requirement_pins(path: Path = REPO / "requirements.txt") -> dict[str, str]:
    """{canonical name: version} of requirements.txt's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def _requires(dist: str) -> list[Any]:
    """The requirements of an installed distribution that apply on the GPU machine (no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    reqs = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(TARGET_MARKERS):
            reqs.append(req)
    return reqs


def module_distributions(modules: tuple[str, ...] = SUITE_MODULES) -> list[str]:
    """The distributions (canonical names) that provide `modules` in this environment."""
    from importlib import metadata

    by_module = metadata.packages_distributions()
    dists = []
    for m in modules:
        if m not in by_module:
            raise SystemExit(
                f"gpu_env: module {m!r} is not installed in {sys.executable}; run this in the project's venv"
            )
        dists += [canonical(d) for d in by_module[m] if canonical(d) not in dists]
    return dists


def plan(machine: dict[str, str | None] | None = None, pins: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """What must travel to the GPU machine: [{dist, version, role, why}], in a stable order."""
    from importlib import metadata

    from packaging.version import Version

    machine = gpu_machine_packages() if machine is None else machine
    pins = requirement_pins() if pins is None else pins
    carry: dict[str, dict[str, Any]] = {}
    queue = [(d, "imported by the suite") for d in module_distributions()]
    while queue:
        dist, why = queue.pop(0)
        if dist in machine or dist in carry:
            continue
        version = pins.get(dist) or metadata.version(dist)
        carry[dist] = {"dist": dist, "version": version, "role": "missing", "why": why}
        for req in _requires(dist):
            name = canonical(req.name)
            if name not in machine:
                queue.append((name, f"required by {dist}"))
                continue
            known = machine[name]
            if not req.specifier or (known is not None and req.specifier.contains(Version(known), prereleases=True)):
                continue  # the machine's own will do
            if name in carry:
                continue
            mine = pins.get(name) or metadata.version(name)
            if not req.specifier.contains(Version(mine), prereleases=True):
                raise SystemExit(f"gpu_env: {dist} needs {name}{req.specifier}, this environment has {mine}")
            carry[name] = {"dist": name, "version": mine, "role": "newer",
                           "why": f"{dist} needs {name}{req.specifier}; the machine's is "
                                  f"{known or 'of unknown version'}: installed there only if older"}  # fmt: skip
    return sorted(carry.values(), key=lambda c: (c["role"], c["dist"]))


def target_tags() -> set[Any]:
    from packaging import tags

    platforms = [f"manylinux_2_{n}_x86_64" for n in range(5, 40)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                      "manylinux1_x86_64"]  # fmt: skip
    abi = f"cp{TARGET_PYTHON[0]}{TARGET_PYTHON[1]}"
    return set(tags.cpython_tags(TARGET_PYTHON, [abi, "abi3", "none"], platforms)) | set(
        tags.compatible_tags(TARGET_PYTHON, abi, platforms)
    )


def wheel_fits(path: Path) -> bool:
    """Whether a wheel installs on CPython 3.12, manylinux x86_64."""
    from packaging.utils import parse_wheel_filename

    return bool(set(parse_wheel_filename(path.name)[3]) & target_tags())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})})  # fmt: skip


def _fail(what: str, proc: subprocess.CompletedProcess) -> SystemExit:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
    return SystemExit(f"gpu_env: {what} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")


def fetch_one(item: dict[str, Any], tmp: Path) -> Path:
    """Download (or, for BUILT_FROM_SDIST, build) one distribution's wheel into `tmp`; return its path."""
    spec = f"{item['dist']}=={item['version']}"
    before = set(tmp.glob("*.whl"))
    if item["dist"] in BUILT_FROM_SDIST:
        # --no-build-isolation: DeepSpeed's setup.py imports torch, which this environment has.
        proc = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-binary", item["dist"],
                    "-w", str(tmp), spec, env=BUILT_FROM_SDIST[item["dist"]])  # fmt: skip
        if proc.returncode != 0:
            raise _fail(f"building {spec} from its sdist", proc)
    else:
        args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                "--abi", "cp312", "-d", str(tmp)]  # fmt: skip
        for plat in TARGET_PLATFORMS:
            args += ["--platform", plat]
        proc = _pip(*args, spec)
        if proc.returncode != 0:
            raise _fail(f"downloading a cp312 manylinux x86_64 wheel of {spec}", proc)
    new = sorted(set(tmp.glob("*.whl")) - before)
    if len(new) != 1:
        raise SystemExit(f"gpu_env: expected one wheel for {spec}, got {[p.name for p in new]}")
    return new[0]


def check_pure(path: Path) -> None:
    """A wheel built here must be pure Python: no compiled extension to mismatch the GPU machine's."""
    with zipfile.ZipFile(path) as z:
        compiled = [n for n in z.namelist() if n.endswith((".so", ".pyd", ".dll", ".dylib"))]
    if compiled or not path.name.endswith("-none-any.whl"):
        raise SystemExit(f"gpu_env: {path.name} is not pure Python ({compiled[:3] or 'platform tag'})")


def fetch(out: Path, max_mib: float = MAX_MIB) -> list[dict[str, Any]]:
    """Fill `out` with the plan's wheels and their manifest; refuse past `max_mib`."""
    items = plan()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="gpu_wheels_") as tmp:
        for item in items:
            path = fetch_one(item, Path(tmp))
            if not wheel_fits(path):
                raise SystemExit(f"gpu_env: {path.name} does not install on CPython 3.12 manylinux x86_64")
            if item["dist"] in BUILT_FROM_SDIST:
                check_pure(path)
                item["built_from"] = "sdist, " + " ".join(f"{k}={v}" for k, v in BUILT_FROM_SDIST[item["dist"]].items())
            dest = out / path.name
            shutil.move(str(path), dest)
            item.update(file=dest.name, sha256=sha256(dest), bytes=dest.stat().st_size)
            print(f"  {item['dist']}=={item['version']:<10} {item['role']:<8} {dest.name} ({item['bytes'] / 2**20:.2f} MiB)",
                  flush=True)  # fmt: skip
    total = sum(i["bytes"] for i in items) / 2**20
    manifest = {"python": "cp312", "platform": "manylinux x86_64", "built_with": sys.executable,
                "machine_packages": str(PACKAGES_FILE.relative_to(REPO)), "total_mib": round(total, 3),
                "wheels": items}  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"gpu_wheels: {len(items)} wheels, {total:.1f} MiB in {out}")
    if total > max_mib:
        raise SystemExit(f"gpu_wheels: {total:.1f} MiB is over the {max_mib:.0f} MiB the GPU run can carry")
    return items


def read_manifest(wheels: Path) -> dict[str, Any]:
    path = wheels / MANIFEST
    if not path.is_file():
        raise SystemExit(f"gpu_env: no {path}; build it with: bash benchmarks/gpu_wheels.sh")
    return json.loads(path.read_text())


def verify(wheels: Path) -> list[dict[str, Any]]:
    """The manifest's wheels are all there, unchanged (sha256)."""
    items = read_manifest(wheels)["wheels"]
    for item in items:
        path = wheels / item["file"]
        if not path.is_file():
            raise SystemExit(
                f"gpu_env: {path} is listed in the manifest but missing; rerun bash benchmarks/gpu_wheels.sh"
            )
        if sha256(path) != item["sha256"]:
            raise SystemExit(f"gpu_env: {path} does not match its sha256 in the manifest")
    return items


def choose(items: list[dict[str, Any]], installed: dict[str, str | None]) -> list[dict[str, Any]]:
    """The wheels to install on this machine: every `missing` one; a `newer` one only over an older copy."""
    from packaging.version import Version

    out = []
    for item in items:
        have = installed.get(item["dist"])
        if item["role"] == "newer" and have is not None and Version(have) >= Version(item["version"]):
            continue
        out.append(item)
    return out


def installed_versions(names: list[str]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _name_version(stem: str) -> tuple[str, str]:
    name, _, version = stem.rpartition("-")
    return canonical(name), version


def install(wheels: Path, target: Path, dry_run: bool = False) -> dict[str, Any]:
    """pip install --no-index --no-deps --target: the chosen wheels, into a fresh `target`.

    With dry_run (on a machine that is not the GPU machine): every wheel, installed as for CPython 3.12
    manylinux x86_64, which checks the wheels and the manifest but imports nothing.
    """
    items = verify(wheels)
    chosen = items if dry_run else choose(items, installed_versions([i["dist"] for i in items]))
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    args = ["install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--quiet", "--target", str(target)]
    if dry_run:
        args += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]
        for plat in TARGET_PLATFORMS:
            args += ["--platform", plat]
    if chosen:
        proc = _pip(*args, *[str(wheels / i["file"]) for i in chosen])
        if proc.returncode != 0:
            raise _fail("pip install", proc)
    found = dict(_name_version(p.name.removesuffix(".dist-info")) for p in target.glob("*.dist-info"))
    for item in chosen:
        if found.get(item["dist"]) != item["version"]:
            raise SystemExit(f"gpu_env: {item['dist']}=={item['version']} is not in {target} after pip install")
    skipped = [i["dist"] for i in items if i not in chosen]
    return {"target": str(target), "installed": {i["dist"]: i["version"] for i in chosen}, "kept_the_machines": skipped,
            "dry_run": dry_run}  # fmt: skip


def covers(wheels: Path) -> list[str]:
    """The distributions the plan needs that the wheels folder's manifest lacks (at that version)."""
    have = {(i["dist"], i["version"]) for i in read_manifest(wheels)["wheels"]}
    return [f"{i['dist']}=={i['version']}" for i in plan() if (i["dist"], i["version"]) not in have]


def gpu_line() -> str:
    """One line naming the GPU; SystemExit (one line, no traceback) when there is none."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is the same answer: no usable torch
        raise SystemExit(f"gpu_suite: {sys.executable} cannot import torch ({type(exc).__name__}: {exc}); "
                         "this suite needs a CUDA build of torch") from None  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_suite: torch {torch.__version__} sees no CUDA GPU; this suite is for a GPU machine "
                         "(make bench runs the CPU set)")  # fmt: skip
    return (f"gpu_suite: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, Python {sys.version.split()[0]}")  # fmt: skip


def check_imports(modules: tuple[str, ...] = SUITE_MODULES) -> dict[str, Any]:
    """Import what the suite imports; SystemExit (one line) naming every module that fails."""
    import importlib

    found, failed = {}, []
    for name in (*modules, "ds_trainer", "ds_trainer.trainer", "ds_trainer.data.pipeline"):
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - reported, all at once
            failed.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            continue
        found[name] = {"version": getattr(mod, "__version__", None), "from": getattr(mod, "__file__", None)}
    if failed:
        raise SystemExit(f"gpu_suite: cannot import {'; '.join(failed)}; build the wheels with bash "
                         "benchmarks/gpu_wheels.sh and carry benchmarks/gpu_wheels")  # fmt: skip
    return found


def _record(path: str | None, key: str, value: Any) -> None:
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.is_file() else {}
    data[key] = value
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan", help="print what must travel to the GPU machine")
    f = sub.add_parser("fetch", help="fill a wheels folder and its manifest")
    f.add_argument("--out", default=str(HERE / "gpu_wheels"))
    f.add_argument("--max-mib", type=float, default=MAX_MIB)
    i = sub.add_parser("install", help="install a wheels folder into --target")
    i.add_argument("--wheels", default=str(HERE / "gpu_wheels"))
    i.add_argument("--target", required=True)
    i.add_argument("--dry-run", action="store_true", help="install every wheel as for CPython 3.12 (any machine)")
    i.add_argument("--record", default=None, help="JSON file to add the result to")
    c = sub.add_parser("covers", help="exit 1 listing what the plan needs and the folder lacks")
    c.add_argument("--wheels", default=str(HERE / "gpu_wheels"))
    sub.add_parser("gpu", help="exit 2 with one line when torch sees no CUDA GPU")
    k = sub.add_parser("check", help="import what the suite imports, or exit 2 with one line")
    k.add_argument("--record", default=None, help="JSON file to add the versions to")
    args = p.parse_args(argv)
    if args.cmd == "plan":
        for item in plan():
            print(f"{item['dist']}=={item['version']}  {item['role']}: {item['why']}")
    elif args.cmd == "fetch":
        fetch(Path(args.out), args.max_mib)
    elif args.cmd == "install":
        result = install(Path(args.wheels), Path(args.target), args.dry_run)
        _record(args.record, "install", result)
        kept = f"; the machine's own {', '.join(result['kept_the_machines'])}" if result["kept_the_machines"] else ""
        print(f"gpu_suite: installed {len(result['installed'])} wheels into {args.target}{kept}")
    elif args.cmd == "covers":
        lacking = covers(Path(args.wheels))
        if lacking:
            print(f"gpu_env: {args.wheels} lacks {', '.join(lacking)}; rerun bash benchmarks/gpu_wheels.sh")
            return 1
        print(f"gpu_env: {args.wheels} covers every distribution the GPU suite needs there")
    elif args.cmd == "gpu":
        print(gpu_line(), flush=True)
    elif args.cmd == "check":
        found = check_imports()
        _record(args.record, "imports", found)
        print("gpu_suite: imports " + ", ".join(f"{k} {v['version']}" for k, v in found.items() if v["version"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
