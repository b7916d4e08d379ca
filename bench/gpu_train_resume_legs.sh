#!/usr/bin/env bash
# Multi-GPU proof of the training stack: a stage of the 7B-shaped model with random weights on the synthetic
# corpus (default configs/7b_stage1_synthetic.yaml), run in legs on different GPU counts, each leg resuming
# the previous leg's ZeRO-2 checkpoint (re-partitioned when the count changes). Prints per leg the GPU
# count, the steps, each stream's loss at the start and the end, and samples/s.
# Usage (repo root, on a CUDA machine):
#   bash bench/gpu_train_resume_legs.sh OUT_DIR "2 4 1" "60 20 20"     # GPUs per leg, steps per leg
#   CONFIG=configs/7b_stage2_synthetic.yaml SETS="train.init_from=" bash bench/gpu_train_resume_legs.sh ...
#   (SETS: extra space-separated key=value overrides; here stage 2 from random weights, not stage 1's export)
# Without deepspeed installed, wheels are taken from .whl_dev/ or .whl/ (scripts/carried_deepspeed.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output folder}
read -r -a LEG_GPUS <<< "${2:-2 4 1}"
read -r -a LEG_STEPS <<< "${3:-60 20 20}"
CONFIG=${CONFIG:-configs/7b_stage1_synthetic.yaml}
RUN_DIR=${RUN_DIR:-outputs/7b_stage1_synthetic}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MAX_JOBS=${MAX_JOBS:-16}
# NVLink multicast stays off on shared hosts (device README).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
. scripts/carried_deepspeed.sh
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"; } 2>&1

echo "== deformable-attention kernel (ahead-of-time build) + synthetic corpus"
start=$(date +%s)
( $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "exit $?" >> "$OUT/build.log" ) &
BUILD=$!
$PY scripts/make_synthetic_data.py --out data/synthetic | tail -1
wait $BUILD
echo "kernel build: $(tail -1 "$OUT/build.log") after $(( $(date +%s) - start ))s"

STAGE=$($PY -c "from chatterbox.config import load_config; print(load_config('$CONFIG').train.stage)") || exit 1
read -r -a EXTRA <<< "${SETS:-}"
OVERRIDES=(--set train.output_dir="$RUN_DIR")
for kv in "${EXTRA[@]}"; do OVERRIDES+=(--set "$kv"); done
rm -rf "$RUN_DIR"
for i in "${!LEG_GPUS[@]}"; do
  gpus=${LEG_GPUS[$i]} steps=${LEG_STEPS[$i]}
  echo "== leg $((i + 1)): $gpus GPU(s), $steps steps"
  start=$(date +%s)
  $PY "startup_stage$STAGE.py" --config "$CONFIG" --gpus "$gpus" --resume auto --max-steps "$steps" \
    "${OVERRIDES[@]}" > "$OUT/leg$((i + 1)).log" 2>&1
  rc=$?
  grep -E "resumed from|Error|error:" "$OUT/leg$((i + 1)).log" | grep -v "^\[20.*warn" | head -5
  echo "exit $rc after $(( $(date +%s) - start ))s"
  cp "$RUN_DIR/train_summary.json" "$OUT/leg$((i + 1)).json" 2>/dev/null
  [ $rc -eq 0 ] || break
done
ls "$RUN_DIR/checkpoints" "$RUN_DIR/export" 2>&1 | tr '\n' ' '; echo

$PY - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

print("| leg | GPUs | steps | loss per stream: mean of its first 5 steps -> last 5 | samples/s (median step) |")
print("|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("leg*.json")):
    s = json.loads(path.read_text())
    rows = s["losses"]
    streams = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/loss")})
    trend = []
    for stream in streams:
        values = [r[f"{stream}/loss"] for r in rows if f"{stream}/loss" in r]
        trend.append(f"{stream} {statistics.mean(values[:5]):.4g} -> {statistics.mean(values[-5:]):.4g}")
    rate = statistics.median(r["samples"] / r["seconds"] for r in rows if r["seconds"] > 0)
    print(f"| {path.stem} | {s['world_size']} | {rows[0]['step']}-{rows[-1]['step']} | {'; '.join(trend)} | {rate:.1f} |")
EOF
