#!/usr/bin/env bash
# One GPU session for the training step: the model's GPU tests (tiny preset, bf16/fp16, gradient
# checkpointing) and the 13b stage-2 step benchmark, ours vs upstream's configuration.
# Usage (repo root, on a CUDA machine): bash scripts/gpu_bench_train.sh [OUT_DIR]
# Without deepspeed installed, wheels are taken from .whl/ (deepspeed 0.19.8, hjson, pydantic,
# pydantic-core, annotated-types, typing-inspection). Extra benchmark flags: BENCH_ARGS="--streams grounding".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-outputs/bench_train}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions} MAX_JOBS=${MAX_JOBS:-16}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if ! $PY -c "import deepspeed" 2>/dev/null; then
  [ -d .whl ] || { echo "deepspeed is not installed and there is no .whl/ folder of wheels"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, deepspeed, transformers, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1

echo "== deformable-attention kernel build (background)"
BUILD_LOG=/tmp/msda_build.log
( timeout 300 $PY -m model.GroundingDINO.ms_deform_attn.build > $BUILD_LOG 2>&1; echo "exit $?" >> $BUILD_LOG ) &
BUILD=$!

echo "== model GPU tests (tiny preset; PyTorch deformable attention so they need not wait for the build)"
CHATTERBOX_MSDA_BACKEND=pytorch $PY -m pytest tests/test_model_gpu.py -q -rs -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15

wait $BUILD
echo "== kernel build: $(tail -2 $BUILD_LOG | tr '\n' ' ')"

echo "== 13b stage-2 step benchmark"
$PY scripts/bench_train_step.py --compare --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
  | grep -E "^\[(ours|upstream[-a-z0-9]*)\]|^\||^\{|Error|error|Thread|File" | grep -v "^\[20"
