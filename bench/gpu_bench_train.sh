#!/usr/bin/env bash
# One GPU session for the training step: the model's and vision branch's GPU tests (tiny preset /
# Swin-B, bf16/fp16, gradient checkpointing), the profile of a 13b grounding micro-step, and the 13b
# stage-2 step benchmark, ours vs upstream's configuration.
# Usage (repo root, on a CUDA machine): bash bench/gpu_bench_train.sh [OUT_DIR]
# Without deepspeed installed, wheels are taken from .whl_dev/ or .whl/ (scripts/carried_deepspeed.sh: deepspeed
# 0.19.8, hjson, pydantic, pydantic-core, annotated-types, typing-inspection).
# Environment:
#   BENCH_ARGS="--streams grounding"   extra flags of bench/bench_train_step.py
#   SKIP_TESTS=1 / SKIP_BENCH=1         leave out the GPU tests / the benchmark
#   SKIP_BUILD=1                        use the kernel already built into the package (_C*.so)
#   PROFILE=1                           profile one 13b grounding micro-step (bench/profile_train_step.py)
#   PROFILE_ARGS="--trace"              extra flags of the profiler
#   BEFORE_TREE=path                    also profile the code in that copy of the repository first
#                                       (e.g. an older commit: `git archive <rev> | tar -x -C path`)
#   THREE_ENGINES=1                     bench/check_three_engines.py (1 and 3 engines) under the DeepSpeed
#                                       in use and, where .whl/ds0111/ holds it, upstream's DeepSpeed 0.11.1
#                                       (docs/BENCHMARKS.md says how that folder is made)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-outputs/bench_train}}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions} MAX_JOBS=${MAX_JOBS:-16}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
. scripts/carried_deepspeed.sh
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, deepspeed, transformers, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1

BUILD_LOG=$OUT/msda_build.log
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  echo "== deformable-attention kernel: using the build in the package ($(ls model/GroundingDINO/ms_deform_attn/_C*.so))"
  echo "exit 0 (prebuilt)" > "$BUILD_LOG"; BUILD=""
else
  echo "== deformable-attention kernel build, ahead of time into the package (background)"
  ( timeout 300 $PY setup.py build_ext --inplace > "$BUILD_LOG" 2>&1; echo "exit $?" >> "$BUILD_LOG" ) &
  BUILD=$!
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== GPU tests (PyTorch deformable attention so they need not wait for the build)"
  CHATTERBOX_MSDA_BACKEND=pytorch $PY -m pytest tests/test_model_gpu.py tests/test_vision_gpu.py tests/test_frozen_graphs.py \
    tests/test_matcher_batched.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi

[ -n "$BUILD" ] && wait $BUILD
echo "== kernel build: $(tail -1 "$BUILD_LOG")"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== GPU tests that need the kernel (CUDA-graph capture of the grounding step)"
  $PY -m pytest tests/test_grounding_graphs.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_kernel.log" | tail -15
fi

if [ "${PROFILE:-0}" = 1 ]; then
  if [ -n "${BEFORE_TREE:-}" ]; then
    echo "== profile of the code in $BEFORE_TREE"
    cp model/GroundingDINO/ms_deform_attn/_C*.so "$BEFORE_TREE/model/GroundingDINO/ms_deform_attn/" 2>/dev/null
    mkdir -p "$BEFORE_TREE/bench" && cp bench/profile_train_step.py bench/flops.py bench/__init__.py "$BEFORE_TREE/bench/"
    (cd "$BEFORE_TREE" && timeout 200 $PY bench/profile_train_step.py --out "$OUT/profile_before" \
      ${PROFILE_ARGS:-} > "$OUT/profile_before.log" 2>&1; echo "exit $?")
    grep -E "^\[profile\]|median wall|^Vision branch alone|Error" "$OUT/profile_before.log"
  fi
  echo "== profile of this tree"
  timeout 200 $PY bench/profile_train_step.py --out "$OUT/profile" ${PROFILE_ARGS:-} > "$OUT/profile.log" 2>&1
  echo "exit $?"
  grep -E "^\[profile\]|median wall|^Vision branch alone|Error" "$OUT/profile.log"
fi

if [ "${THREE_ENGINES:-0}" = 1 ]; then
  echo "== upstream's three engines: gradient hooks and step time"
  three_engines() {  # label, then PYTHONPATH for that DeepSpeed
    for n in 1 3; do
      PYTHONPATH=$2 timeout 150 $PY bench/check_three_engines.py --engines $n --json "$OUT/engines_$1_$n.json" \
        > "$OUT/engines_$1_$n.log" 2>&1
      echo "$1, $n engine(s): exit $? $(tail -1 "$OUT/engines_$1_$n.log" | cut -c1-600)"
    done
  }
  three_engines installed "${PYTHONPATH:-}"
  if [ -d .whl/ds0111/src/deepspeed ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_ds0111 \
      .whl/ds0111/*.whl && three_engines ds0111 "$PWD/.whl/ds0111/src:/tmp/site_ds0111"
  fi
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== 13b stage-2 step benchmark"
  $PY bench/bench_train_step.py --compare --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
    | grep -E "^\[(ours|upstream[-a-z0-9]*)\]|^\||^\{|Error|error|Thread|File" | grep -v "^\[20"
fi
