#!/usr/bin/env bash
# The GPU proof run: the quickstart's job (synthetic corpus -> stage 1 -> stage 2 -> evaluation, every step
# the command a user runs: startup_stage*.py with DeepSpeed, checkpoints, the export, evaluation/*.py) on the
# small preset (configs/small_stage*.yaml) on one GPU, at a larger scale than the CPU quickstart.
# Usage (repo root, on a CUDA machine): bash scripts/gpu_proof_run.sh OUT_DIR [quickstart.py options]
# OUT_DIR receives the summary JSON, every step's log, both stages' loss curves (train_summary.json and
# tensorboard events), the picture of predicted boxes and the evaluation metrics.
# Without deepspeed installed, wheels are taken from .whl_dev/ or .whl/ (scripts/carried_deepspeed.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output folder}; shift
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MAX_JOBS=${MAX_JOBS:-16}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the repository's packages, installed or not
. scripts/carried_deepspeed.sh
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, transformers, deepspeed as ds
print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', ds.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

echo "== deformable-attention kernel (ahead-of-time build)"
start=$(date +%s)
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "exit $? after $(( $(date +%s) - start ))s"

captions=()
if ! command -v java >/dev/null || ! $PY -c "import pycocoevalcap" 2>/dev/null; then
  # the accuracies need neither; the prediction files come back in the archive, to be scored elsewhere
  echo "no Java runtime or pycocoevalcap here: caption metrics skipped" | tee -a "$OUT/machine.txt"
  captions=(--no-caption-metrics)
fi

echo "== quickstart, small preset"
start=$(date +%s)
# PROOF_LIMIT_S bounds the job so that what it wrote is still copied out under a caller's time limit
timeout "${PROOF_LIMIT_S:-3600}" $PY scripts/quickstart.py --preset small --gpus 1 --work-dir outputs/gpu_proof_run \
  "${captions[@]}" "$@" 2>&1 | tee "$OUT/quickstart.log"
rc=${PIPESTATUS[0]}
echo "exit $rc after $(( $(date +%s) - start ))s"

WORK=outputs/gpu_proof_run
tail -1 "$OUT/quickstart.log" > "$OUT/summary.json"
cp "$WORK/predicted_boxes.png" "$OUT/" 2>/dev/null
for stage in 1 2; do
  cp "outputs/small_stage$stage/train_summary.json" "$OUT/train_summary_stage$stage.json" 2>/dev/null
done
# Every step's log, the evaluation metrics and the tensorboard event files in one archive (the device
# tool brings back few files).
tar czf "$OUT/logs_and_curves.tgz" "$WORK"/*.log "$WORK"/eval_*/*.json "$WORK"/eval_*/*.jsonl \
  runs/small_stage1 runs/small_stage2 2>/dev/null
ls -la "$OUT"
exit $rc
