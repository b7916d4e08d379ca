#!/usr/bin/env bash
# Small-preset stage 1 in several language-model variants side by side on one GPU, each evaluated on the
# held-out grounding split with the query-swap control, broken down by what the other shapes share with the
# named one (grounding_by_distractor.py) and probed for the colour and kind its [VG] queries carry
# (query_attributes.py). Usage (repo root, CUDA machine): bash docs/results/gpu_proof_run/query_words/variants.sh OUT STEPS NAME="SETS" ...
set -uo pipefail
OUT=${1:?}; STEPS=${2:?}; shift 2
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
. scripts/carried_deepspeed.sh
PRESET=${PRESET:-small}   # tiny: a quick check of this script on a CPU
DATA=data/synthetic_$PRESET; [ "$PRESET" = tiny ] && DATA=data/synthetic
DIAG=docs/results/tiny_recipe/query_path
{ date -u; nvidia-smi --query-gpu=name --format=csv,noheader; } 2>&1 | tee "$OUT/machine.txt"
[ -d $DATA ] || $PY scripts/make_synthetic_data.py --out $DATA --num-images 12000 \
  --eval-fraction 0.05 > "$OUT/data.log" 2>&1
variant() {
  local name=$1 sets=() s
  for s in $2; do sets+=(--set "$s"); done
  local dir=outputs/variants/$name
  local start=$(date +%s)
  $PY startup_stage1.py --config ${PRESET}_stage1 --set train.steps_per_epoch=$STEPS --set train.output_dir=$dir \
    --set data.num_workers=4 "${sets[@]}" > "$OUT/$name.stage1.log" 2>&1
  echo "$name: stage 1 exit $? after $(( $(date +%s) - start ))s" | tee -a "$OUT/timeline.txt"
  $PY evaluation/coco_grounding.py --config ${PRESET}_stage1 --checkpoint $dir/export "${sets[@]}" --dtype fp32 \
    --data $DATA/MSCOCO2017 --query-swap --output-dir $dir/eval > "$OUT/$name.eval.log" 2>&1
  cp $dir/eval/summary.json "$OUT/$name.eval_summary.json"
  $PY $DIAG/grounding_by_distractor.py $dir/eval > "$OUT/$name.by_distractor.json"
  $PY $DIAG/query_attributes.py $dir/export --config ${PRESET}_stage2 --batches 15 "${sets[@]}" \
    > "$OUT/$name.query_attributes.log" 2>&1
  tail -1 "$OUT/$name.query_attributes.log" > "$OUT/$name.query_attributes.json"
  echo "$name: done after $(( $(date +%s) - start ))s" | tee -a "$OUT/timeline.txt"
}
for spec in "$@"; do
  variant "${spec%%=*}" "${spec#*=}" &
  sleep 5
done
wait
for f in "$OUT"/*.eval_summary.json; do echo "$f"; grep -h '"success_rate' "$f"; done
cat "$OUT"/*.by_distractor.json "$OUT"/*.query_attributes.json
