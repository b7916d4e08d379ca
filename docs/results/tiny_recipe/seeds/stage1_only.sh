#!/usr/bin/env bash
# Stage 1 of the tiny recipe alone, then the held-out grounding with its query-swapped control: does the
# [VG] query read the words yet? Run in a repository whose data/synthetic holds the quickstart's corpus.
# Usage: bash docs/results/tiny_recipe/seeds/stage1_only.sh NAME SEED [--set KEY=VALUE ...]
set -euo pipefail
NAME=$1; SEED=$2; shift 2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python startup_stage1.py --config tiny_stage1 --set train.seed="$SEED" --set train.output_dir="outputs/s1_$NAME" \
  "$@" > "outputs/s1_$NAME.log" 2>&1
.venv/bin/python evaluation/coco_grounding.py --config tiny_stage1 --checkpoint "outputs/s1_$NAME/export" --dtype fp32 \
  --data data/synthetic/MSCOCO2017 --query-swap --output-dir "outputs/eval_s1_$NAME" | tail -1
