#!/usr/bin/env bash
# Reproduce a paper recipe on GenImage, end to end:
#   scripts/reproduce_genimage.sh RECIPE GENIMAGE_DIR [OUT]
#   e.g. scripts/reproduce_genimage.sh ds_configs/recipes/univfd_vitl14_linear_probe.yaml /data/GenImage
# 1. shard GENIMAGE_DIR into OUT/shards with `ds-trainer shard` (skipped when GENIMAGE_DIR is already a
#    shard set, i.e. holds manifest.json, or when OUT/shards is complete from an earlier run);
# 2. train with the recipe through launch.sh (every local GPU, or DS_TRAINER_CPU_RANKS CPU ranks);
# 3. evaluate the `best` checkpoint with the protocol (8 generators' val splits, accuracy at 0.5) and
#    the genimage-degraded robustness preset (GenImage Table 5: resize 112/64, JPEG 65/30, blur 3/5);
# 4. write the report with the paper beside the run (`ds-trainer report --reference`).
# OUT defaults to results/reproduce/<recipe name>. Environment:
#   REPRODUCE_SET        space-separated KEY=VALUE overrides for training (e.g. model.model_name=tiny)
#   REPRODUCE_REFERENCE  published.json entry to compare with (default: the first naming this recipe)
#   REPRODUCE_EVAL_ARGS  extra `ds-trainer eval` arguments (e.g. --bootstrap 0)
#   DS_TRAINER_PYTHON    the interpreter (default .venv/bin/python next to this repo), as launch.sh
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: scripts/reproduce_genimage.sh RECIPE GENIMAGE_DIR [OUT]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
recipe="$1" src="$2"
name="$(basename "$recipe" .yaml)"
out="${3:-results/reproduce/$name}"
py="${DS_TRAINER_PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
export DS_TRAINER_PYTHON="$py"
dst() { "$py" -m ds_trainer "$@"; }
[ -f "$recipe" ] || { echo "reproduce_genimage.sh: recipe $recipe does not exist" >&2; exit 2; }
[ -d "$src" ] || { echo "reproduce_genimage.sh: GENIMAGE_DIR $src is not a directory" >&2; exit 3; }
reference="${REPRODUCE_REFERENCE:-$("$py" -c 'import sys; from ds_trainer.published import for_recipe; print(" ".join(for_recipe(sys.argv[1])[:1]))' "$name")}"
mkdir -p "$out"

if [ -f "$src/manifest.json" ]; then
  shards="$src"
else
  shards="$out/shards"
  if [ ! -f "$shards/manifest.json" ]; then
    echo "== shard $src -> $shards"
    dst shard --src "$src" --out "$shards" --no-progress
  fi
fi

sets=(--set "data.shards=$shards" --set "training.checkpoint_dir=$out/checkpoints" --set "logging.run_dir=$out/run")
for kv in ${REPRODUCE_SET:-}; do sets+=(--set "$kv"); done
echo "== train $recipe"
"$here/launch.sh" --config "$recipe" "${sets[@]}"

read -r -a eval_extra <<<"${REPRODUCE_EVAL_ARGS:-}"
echo "== eval $out/checkpoints/best"
dst eval --load-dir "$out/checkpoints" --tag best --out "$out/eval_best.json" --perturb genimage-degraded \
  "${eval_extra[@]}"

report=(report --eval "$out/eval_best.json" --run "$out/run" --out "$out/report")
if [ -n "$reference" ]; then
  report+=(--reference "$reference")
else
  echo "== no published.json entry names recipe $name: the report has no paper beside the run"
fi
echo "== report"
dst "${report[@]}"
