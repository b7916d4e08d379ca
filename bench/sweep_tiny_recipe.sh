#!/usr/bin/env bash
# Run several tiny-preset quickstarts side by side on one many-core machine, two cores each, to compare
# recipes (docs/results/tiny_recipe). Each variant runs in its own copy of the repository, so corpora,
# checkpoints and evaluations never collide.
# Usage (repo root): bash bench/sweep_tiny_recipe.sh OUT_DIR VARIANTS_FILE
# VARIANTS_FILE: one variant per line, "name quickstart-options..." (e.g.
#   "patch7 --stage1-steps 1000 --set model.clip.patch_size=7"); '#' starts a comment.
# OUT_DIR/<name>.json is the variant's last quickstart line, OUT_DIR/<name>.log its whole output.
# SWEEP_DEVICE=cuda trains and evaluates every variant on the machine's GPU (all share it; numbers differ
# from a CPU run's in the last digits of every float, so confirm a chosen recipe with the CPU quickstart).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output folder}; VARIANTS=${2:?variants file}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. scripts/carried_deepspeed.sh
{ date -u; lscpu | grep -E "Model name|^CPU\(s\)"; } > "$OUT/machine.txt"
if [ "${SWEEP_DEVICE:-cpu}" = cuda ]; then visible=${CUDA_VISIBLE_DEVICES:-0}; device="--set device=cuda"
else visible=""; device=""; fi
core=0
pids=()
while read -r name options; do
  case "$name" in ''|'#'*) continue ;; esac
  copy=/tmp/sweep/$name
  rm -rf "$copy"; mkdir -p "$copy"
  tar --exclude=./.git --exclude=./outputs --exclude=./data --exclude=./runs --exclude=./.venv -cf - . \
    | tar -xf - -C "$copy"
  # shellcheck disable=SC2086  # options are words
  ( cd "$copy" && CUDA_VISIBLE_DEVICES=$visible PYTHONPATH=$copy:$PYTHONPATH taskset -c $core,$((core + 1)) \
      timeout "${SWEEP_LIMIT_S:-3600}" $PY scripts/quickstart.py --no-caption-metrics $device $options \
      > "$OUT/$name.log" 2>&1
    rc=$?; tail -1 "$OUT/$name.log" > "$OUT/$name.json"; echo "$name exit $rc after ${SECONDS}s" ) &
  pids+=($!)
  core=$((core + 2))
done < "$VARIANTS"
wait "${pids[@]}"
ls -la "$OUT"
