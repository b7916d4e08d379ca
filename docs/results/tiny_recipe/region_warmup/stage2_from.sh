#!/usr/bin/env bash
# Stage 2 of the tiny recipe from another initial export, then the held-out referring and grounding
# evaluations; prints one JSON line (referring colour+kind, [colour, kind], grounding, query-swapped).
# Usage (repo root): bash docs/results/tiny_recipe/region_warmup/stage2_from.sh NAME INIT_EXPORT [--set K=V ...]
set -euo pipefail
NAME=$1; INIT=$2; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
O=outputs/diag_$NAME; rm -rf "$O"; mkdir -p "$O"
.venv/bin/python startup_stage2.py --config tiny_stage2 --set train.init_from="$INIT" \
  --set train.output_dir="$O/train" "$@" > "$O/stage2.log" 2>&1
.venv/bin/python evaluation/refcocog_referring.py --config tiny_stage2 --checkpoint "$O/train/export" --dtype fp32 \
  --no-caption-metrics --split val --output-dir "$O/eval_referring" > "$O/eval_referring.log" 2>&1
.venv/bin/python evaluation/coco_grounding.py --config tiny_stage2 --checkpoint "$O/train/export" --dtype fp32 \
  --data data/synthetic/MSCOCO2017 --query-swap --output-dir "$O/eval_grounding" > "$O/eval_grounding.log" 2>&1
.venv/bin/python - "$NAME" "$O" <<'PY'
import json, sys
name, out = sys.argv[1:]
last = lambda f: json.loads(open(f"{out}/{f}").read().strip().splitlines()[-1])
r, g = last("eval_referring.log"), last("eval_grounding.log")
print(json.dumps({"name": name, "referring": r["name_accuracy"], "colour_kind": r["name_word_accuracy"],
                  "grounding": g["success_rate"], "query_swapped": g["success_rate_query_swapped"]}))
PY
