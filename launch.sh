#!/usr/bin/env bash
""":"
# launch.sh — train with DeepSpeed on every local GPU, or on N CPU ranks where there is none.
#
#   ./launch.sh --config ds_configs/demo.yaml [--load-dir DIR] [--set KEY=VALUE ...]
#   deepspeed --num_gpus 8 launch.sh --config ds_configs/X.yaml [...]
#
# This file is bash *and* Python. Run directly, the bash part below starts the deepspeed
# launcher on this file; the launcher then runs it once per rank with Python (as it does
# any script unless given --no_python), which skips this string and runs the Python part.
# Environment: DS_TRAINER_PYTHON (interpreter; default .venv/bin/python next to this file),
# NUM_GPUS (GPUs to use; default all), DS_TRAINER_CPU_RANKS (CPU ranks; default 2), MASTER_PORT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${DS_TRAINER_PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
if [ -n "${RANK:-}" ] && [ -n "${LOCAL_RANK:-}" ]; then
  # Started as one rank by a launcher given --no_python: be that rank.
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m ds_trainer train "$@"
fi
ngpu="$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ "$ngpu" -gt 0 ]; then
  ranks="${NUM_GPUS:-$ngpu}"
else
  ranks="${DS_TRAINER_CPU_RANKS:-2}"
fi
port="${MASTER_PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
exec "$py" -m deepspeed.launcher.runner --num_gpus "$ranks" --master_port "$port" "$here/launch.sh" "$@"
":"""
# Python: one rank of the job (the deepspeed launcher runs this file with its Python).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ds_trainer.cli import main  # noqa: E402

sys.exit(main(["train", *sys.argv[1:]]))
