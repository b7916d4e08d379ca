#!/usr/bin/env bash
# GPU checks in one device session: build the package as a user would (`pip install -e .` compiles the
# deformable-attention kernel ahead of time), run every GPU test, then the 13b chat latency benchmark.
# Usage (repo root, on a CUDA machine): bash bench/gpu_session.sh [OUT_DIR]
# Missing Python packages are taken from carried wheel folders (.whl/, .upstream/wheels/) if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MAX_JOBS=${MAX_JOBS:-16}
wheels=$(ls .whl/*.whl .upstream/wheels/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1

echo "== pip install -e . (ahead-of-time CUDA build)"
start=$(date +%s)
$PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
echo "exit $? after $(( $(date +%s) - start ))s; built: $(ls model/GroundingDINO/ms_deform_attn/_C*.so 2>/dev/null)"

echo "== GPU tests"
$PY -m pytest tests/test_ms_deform_attn.py tests/test_vision_gpu.py tests/test_model_gpu.py tests/test_frozen_graphs.py -q -rs \
  -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

echo "== chat latency, 13b preset"
$PY bench/bench_chat.py --preset 13b --merge-lora --out "$OUT/bench_chat_13b.json" 2>&1 \
  | tee "$OUT/bench_chat.log" | tail -40
