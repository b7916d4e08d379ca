#!/usr/bin/env bash
# One GPU session for the deformable-attention op: build our kernel, run the GPU tests, build upstream's
# kernel from the copy outside git (.upstream/deformable_detr_ops, never committed), benchmark.
# Usage (repo root, on a CUDA machine): bash bench/gpu_check_ms_deform_attn.sh [OUT_DIR]
# Pass QUICK=1 for a short benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-outputs/ms_deform_attn}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
export MAX_JOBS=${MAX_JOBS:-16}
if ! $PY -c "import pytest" 2>/dev/null && [ -d .upstream/wheels ]; then  # pytest wheels carried along
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .upstream/wheels/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

echo "== build our kernel (JIT, cached under $TORCH_EXTENSIONS_DIR)"
start=$(date +%s)
$PY -m model.GroundingDINO.ms_deform_attn.build > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start ))s"

echo "== GPU + CPU tests"
$PY -m pytest tests/test_ms_deform_attn.py -q -rs 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== upstream kernel source (patched for current torch APIs, outside git)"
UP=/tmp/upstream_msda
if [ -d .upstream/deformable_detr_ops ]; then
  rm -rf "$UP" && cp -r .upstream/deformable_detr_ops "$UP"
  # Deprecated accessors upstream uses; semantics unchanged.
  sed -i -e 's/\.type()\.is_cuda()/.is_cuda()/g' -e 's/AT_DISPATCH_FLOATING_TYPES(\([a-z_]*\)\.type()/AT_DISPATCH_FLOATING_TYPES(\1.scalar_type()/g' \
         -e 's/\.data<\([a-z0-9_]*\)>()/.data_ptr<\1>()/g' -e 's/AT_ASSERTM(/TORCH_CHECK(/g' \
         "$UP"/src/*.h "$UP"/src/cuda/*.cu "$UP"/src/cuda/*.h "$UP"/src/cpu/*.cpp "$UP"/src/cpu/*.h
  UPARG="--upstream-src $UP"
else
  echo "no .upstream/deformable_detr_ops: upstream kernel not timed"; UPARG=""
fi

echo "== benchmark"
BENCH_ARGS=""
[ "${QUICK:-0}" = 1 ] && BENCH_ARGS="--quick"
$PY bench/bench_ms_deform_attn.py $UPARG --out "$OUT" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log" | grep -v "^b[28] " | tail -80
