#!/usr/bin/env bash
# The GPU benchmark suite: one CUDA GPU (sized for one H200), under 8 minutes, nothing needed but
# this repository and the packages it pins (requirements.txt, plus the CUDA build of torch==2.13.0).
#
#   bash benchmarks/gpu_suite.sh                # PYTHON=/path/to/python to use another environment
#
# 1. gpu_bench.py: CLIP ViT-B/32 and ViT-L/14 vision towers at 224 px (the released architectures,
#    random init), bf16, ZeRO 2, one rank, with pre-made device batches and with the streaming
#    WebDataset loader: images/s, MFU against the GPU's datasheet peak, peak memory, data wait.
# 2. speed_switches.py on the GPU: SDPA vs eager attention, gradient checkpointing, torch.compile,
#    the optimizer kernels, as ratios.
# 3. step_overhead.py on the GPU: Trainer vs bare DeepSpeed loop vs plain PyTorch.
# Then benchmarks/RESULTS.md is rewritten from benchmarks/results/*.json.
# Every part has its own time limit, so one that hangs cannot take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYEOF' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "deepspeed", "transformers", "webdataset", "pydantic", "PIL", "yaml")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_suite: missing packages {missing}: pip install torch==2.13.0 && "
             "pip install --no-build-isolation -r requirements.txt && pip install --no-deps -e .")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_suite: torch {torch.__version__} sees no CUDA GPU; this suite is for a GPU machine "
             "(make bench runs the CPU set)")
print(f"gpu_suite: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}", flush=True)
PYEOF
start=$SECONDS
status=0
step() {  # step <limit seconds> <script> [args...]
    local limit=$1; shift
    echo "== $* (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$PY" "$@" || { echo "gpu_suite: $* failed (exit $?)"; status=1; }
}
step 270 benchmarks/gpu_bench.py
step 120 benchmarks/speed_switches.py --out benchmarks/results/speed_switches_gpu.json
step 60 benchmarks/step_overhead.py --out benchmarks/results/step_overhead_gpu.json --steps 30 --repeats 3 --zero-stage 2 --hidden 768 --layers 12 --image-size 224 --batch-size 128
"$PY" benchmarks/write_results.py
echo "gpu_suite: done in $((SECONDS - start)) s (exit $status)"
exit $status
