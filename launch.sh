#!/usr/bin/env bash
""":"
# launch.sh — train with DeepSpeed on every local GPU, or on N CPU ranks where there is none.
#
#   ./launch.sh --config ds_configs/demo.yaml [--load-dir DIR] [--set KEY=VALUE ...]
#   ./launch.sh [LAUNCHER ARGS ...] -- --config ds_configs/X.yaml [...]     # e.g. --hostfile H --no_ssh ...
#   deepspeed --num_gpus 8 launch.sh --config ds_configs/X.yaml [...]
#   srun launch.sh --config ds_configs/X.yaml [...]                          # Slurm: one task per GPU/CPU rank
#
# This file is bash *and* Python. Run directly, the bash part below starts the deepspeed
# launcher on this file; the launcher then runs it once per rank with Python (as it does
# any script unless given --no_python), which skips this string and runs the Python part.
# Arguments before a `--` (and the words of DS_LAUNCHER_ARGS, first) go to the deepspeed launcher
# (python -m deepspeed.launcher.runner, via ds_trainer/launcher.py): --hostfile/--include/--exclude replace the default
# --num_gpus, so a hostfile's slots= decide the ranks per node.
# Slurm: as a task of a multi-task srun step (SLURM_STEP_ID set, more than one task), this file
# is that one rank and runs the trainer directly; ds_trainer.distributed maps SLURM_PROCID/LOCALID/
# STEP_NUM_TASKS/STEP_NODELIST to RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR (MASTER_PORT from SLURM_JOB_ID).
# With DS_TRAINER_SLURM_MODE=node (srun --ntasks-per-node=1) it instead starts one deepspeed
# launcher per node (--no_ssh --node_rank SLURM_NODEID) over all of the node's GPUs/CPU ranks.
# An sbatch script itself (no srun) or a one-task step starts the launcher on this node, as outside Slurm.
# Environment: DS_TRAINER_PYTHON (interpreter; default .venv/bin/python next to this file),
# NUM_GPUS (GPUs to use; default all), DS_TRAINER_CPU_RANKS (CPU ranks; default 2), MASTER_PORT,
# DS_LAUNCHER_ARGS, DS_TRAINER_SLURM_MODE (task, the default, or node), DS_ACCELERATOR (default cpu
# where torch sees no GPU). DeepSpeed's ops build in this environment's own directory with its own
# ninja, whatever PATH holds (ds_trainer/ops.py, applied when each rank imports ds_trainer).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${DS_TRAINER_PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
launcher_args=()
if [ -n "${DS_LAUNCHER_ARGS:-}" ]; then read -r -a launcher_args <<<"$DS_LAUNCHER_ARGS"; fi
for arg in "$@"; do
  if [ "$arg" = "--" ]; then
    while [ "$1" != "--" ]; do launcher_args+=("$1"); shift; done
    shift
    break
  fi
done
if [ -n "${RANK:-}" ] && [ -n "${LOCAL_RANK:-}" ]; then
  # Started as one rank by a launcher given --no_python: be that rank.
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m ds_trainer train "$@"
fi
slurm_mode="${DS_TRAINER_SLURM_MODE:-task}"
if [ -z "${RANK:-}" ] && [ -n "${SLURM_STEP_ID:-${SLURM_STEPID:-}}" ] && [ -n "${SLURM_PROCID:-}" ] \
   && [ "${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-1}}" -gt 1 ] && [ "$slurm_mode" = task ]; then
  # One task of an srun step: this process is rank SLURM_PROCID (ds_trainer.distributed maps the rest).
  if [ ${#launcher_args[@]} -gt 0 ]; then
    echo "launch.sh: deepspeed launcher arguments (${launcher_args[*]}) make no sense in an srun task:" \
      "srun starts the ranks (use DS_TRAINER_SLURM_MODE=node for one launcher per node)" >&2
    exit 2
  fi
  echo "launch.sh: Slurm task ${SLURM_PROCID} of ${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}" \
    "on node ${SLURMD_NODENAME:-$(hostname)}" >&2
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m ds_trainer train "$@"
fi
# Ask torch (a ~2 s import) only where a GPU driver is present: no NVIDIA or AMD device node, no GPU.
ngpu=0
if [ -e /dev/nvidiactl ] || [ -e /dev/kfd ] || compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
  ngpu="$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi
if [ "$ngpu" -gt 0 ]; then
  ranks="${NUM_GPUS:-$ngpu}"
else
  ranks="${DS_TRAINER_CPU_RANKS:-2}"
  # CPU ranks: say so, or the launcher and every rank log DeepSpeed's "Setting accelerator to CPU" notice.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
if [ -n "${SLURM_STEP_ID:-${SLURM_STEPID:-}}" ] && [ "${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-1}}" -gt 1 ] \
   && [ "$slurm_mode" = node ]; then
  # One launcher per node: a hostfile of the step's nodes, $ranks slots each; this node is SLURM_NODEID.
  mapfile -t node_args < <(PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$py" -c \
    'import sys; from ds_trainer.slurm import slurm_node_launcher_args as f; print("\n".join(f(int(sys.argv[1]))))' \
    "$ranks")
  [ ${#node_args[@]} -gt 0 ] || { echo "launch.sh: could not map this Slurm step to launcher arguments" >&2; exit 2; }
  echo "launch.sh: Slurm node ${SLURM_NODEID:-0} (${SLURMD_NODENAME:-$(hostname)}): launcher ${node_args[*]}" >&2
  launcher_args=("${node_args[@]}" "${launcher_args[@]}")
elif [ "$slurm_mode" != task ] && [ "$slurm_mode" != node ]; then
  echo "launch.sh: DS_TRAINER_SLURM_MODE must be task or node, not '$slurm_mode'" >&2
  exit 2
fi
defaults=()
case " ${launcher_args[*]} " in
  *" -H "* | *" --hostfile"* | *" -i "* | *" --include"* | *" -e "* | *" --exclude"*) ;;  # they size the job
  *) defaults+=(--num_gpus "$ranks") ;;
esac
port="${MASTER_PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
# deepspeed.launcher.runner, through ds_trainer/launcher.py: Ctrl-C is one line and exit 130, not its traceback.
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m ds_trainer.launcher "${defaults[@]}" --master_port "$port" \
  "${launcher_args[@]}" "$here/launch.sh" "$@"
":"""
# Python: one rank of the job (the deepspeed launcher runs this file with its Python).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ds_trainer.cli import main  # noqa: E402

sys.exit(main(["train", *sys.argv[1:]]))
