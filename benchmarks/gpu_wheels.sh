#!/usr/bin/env bash
# Fill benchmarks/gpu_wheels/ (ignored by git) with the wheels the GPU suite needs on the project's GPU
# machine and that the machine lacks (benchmarks/gpu_machine_packages.txt): CPython 3.12, manylinux
# x86_64. Run it here, where PyPI is reachable; benchmarks/gpu_suite.sh installs them there.
#
#   bash benchmarks/gpu_wheels.sh                  # PYTHON=/path/to/python: the project's venv (default .venv)
#   bash benchmarks/gpu_wheels.sh --out DIR
#
# deepspeed is built from its sdist at requirements.txt's pin with DS_BUILD_OPS=0 (pure Python: its
# ops are JIT-built where they run); the others are downloaded as cp312 manylinux wheels at the pins
# (requirements.txt's, else this venv's tested versions). The folder gets manifest.json (dist,
# version, file, sha256, why) and must stay under 60 MiB (the device tool carries 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=benchmarks/gpu_wheels
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "gpu_wheels: unknown argument $1 (usage: bash benchmarks/gpu_wheels.sh [--out DIR])" >&2; exit 2 ;;
    esac
done
"$PY" benchmarks/gpu_env.py fetch --out "$OUT"
"$PY" benchmarks/gpu_env.py covers --wheels "$OUT"
du -sh "$OUT"
