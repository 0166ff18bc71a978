#!/usr/bin/env bash
# The GPU benchmark suite: one CUDA GPU (sized for one H200), under 8 minutes, on a machine that has a
# CUDA torch and transformers but may lack the rest (no network needed).
#
#   bash benchmarks/gpu_suite.sh [--out DIR]    # or RESULTS_DIR=DIR; default benchmarks/results
#                                               # PYTHON=/path/to/python to use another interpreter
#
# Where benchmarks/gpu_wheels/manifest.json is (bash benchmarks/gpu_wheels.sh builds it; GPU_WHEELS=DIR
# for another folder), its wheels are installed with pip install --no-index --no-deps --target into
# GPU_SITE (default /tmp/ds_trainer_gpu_site), which goes first on PYTHONPATH: the machine's own torch
# and transformers are used. Then, each part writing its JSON into the results folder as it finishes:
#
#   part                                                                  cap, s
#   GPU check (nothing is written without a GPU: exit 2, one line)           20
#   install the wheels                                                       40
#   import check (exit 2, one line, naming what fails to import)             30
#   1. loader alone against a no-op consumer (data_throughput.py): 512² and
#      1024², JPEG q96 and PNG, crop=resize without draft, 12 workers        50
#   2. gpu_bench.py: CLIP ViT-B/32 (batch 256) and ViT-L/14 (batch 64) bf16,
#      ZeRO 2, pre-made device batches first, then the streaming loader:
#      img/s, MFU, data-wait fraction, peak memory; a JSON row per run      180
#   3. step_overhead.py: Trainer vs DeepSpeed loop vs PyTorch, ViT-B/16 at
#      224 px, batch 128, bf16                                               80
#   4. speed_switches.py: SDPA vs eager attention, gradient checkpointing    40
#   RESULTS.md rendered from the results folder                              10
#   sum, with up to 2 s to kill each part that overruns: 450 + 16 = 466 s (7 min 46 s)
#
# The optimizer is torch's fused AdamW through DeepSpeed (torch_adam), so that no part waits for
# nvcc to JIT-build DeepSpeed's FusedAdam (about a minute, per part).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${RESULTS_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) RESULTS="${2:-}"; shift 2 || shift ;;
        --out=*) RESULTS="${1#--out=}"; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_suite: unknown argument $1 (usage: bash benchmarks/gpu_suite.sh [--out DIR])" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
timeout --kill-after=2 20 "$PY" benchmarks/gpu_env.py gpu || exit 2
start=$SECONDS
RESULTS="${RESULTS:-benchmarks/results}"
mkdir -p "$RESULTS" && RESULTS="$(cd "$RESULTS" && pwd)" || { echo "gpu_suite: cannot create $RESULTS" >&2; exit 2; }
ENV_JSON="$RESULTS/gpu_env.json"
rm -f "$ENV_JSON"
WHEELS="${GPU_WHEELS:-benchmarks/gpu_wheels}"
if [ -f "$WHEELS/manifest.json" ]; then
    SITE="${GPU_SITE:-/tmp/ds_trainer_gpu_site}"
    timeout --kill-after=2 40 "$PY" benchmarks/gpu_env.py install --wheels "$WHEELS" --target "$SITE" \
        --record "$ENV_JSON" || { echo "gpu_suite: installing $WHEELS failed" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # ds_trainer, in every subprocess and loader worker
timeout --kill-after=2 30 "$PY" benchmarks/gpu_env.py check --record "$ENV_JSON" || exit 2
status=0
step() {  # step <cap seconds> <script> [args...]
    local cap=$1; shift
    echo "== $* (cap ${cap}s, at $((SECONDS - start)) s)"
    timeout --kill-after=2 "$cap" "$PY" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "gpu_suite: $1 failed (exit $rc$([ $rc -ge 124 ] && echo ": over its ${cap} s cap"))"
        status=1
    fi
}
step 50 benchmarks/data_throughput.py --sizes 512,1024 --formats jpeg,png --workers 12 --batch-size 32 \
    --batches 24 --no-draft --out "$RESULTS/data_throughput_gpu.json"
step 180 benchmarks/gpu_bench.py --models b32,l14 --loaders memory,stream --steps 30 --skip 5 --torch-adam \
    --row-timeout 70 --out "$RESULTS/gpu_suite.json"
step 80 benchmarks/step_overhead.py --precision bf16 --torch-adam --steps 20 --repeats 3 --skip 3 --zero-stage 2 \
    --hidden 768 --layers 12 --image-size 224 --batch-size 128 --out "$RESULTS/step_overhead_gpu.json"
step 40 benchmarks/speed_switches.py --switches attention,checkpointing --no-engine-check --repeats 4 \
    --out "$RESULTS/speed_switches_gpu.json"
if [ "$RESULTS" = "$PWD/benchmarks/results" ]; then MD=benchmarks/RESULTS.md; else MD="$RESULTS/RESULTS.md"; fi
step 10 benchmarks/write_results.py --results "$RESULTS" --out "$MD"
echo "gpu_suite: done in $((SECONDS - start)) s (exit $status); results in $RESULTS"
exit $status
