#!/usr/bin/env bash
# Evaluation throughput on one GPU (bench_eval_throughput.py), after the graphed-vs-eager grounding test.
# Usage (repo root, on a CUDA machine): bash bench/gpu_eval_throughput.sh OUT_DIR [tests] [bench]
# Environment: EVAL_ARGS (extra flags of bench_eval_throughput.py, e.g. "--benchmarks referring").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_eval_throughput.sh OUT_DIR [tests] [bench]}; shift
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
SECTIONS=${*:-tests bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MAX_JOBS=${MAX_JOBS:-16}
. scripts/carried_deepspeed.sh
. bench/gpu_machine.sh
for section in $SECTIONS; do
  case $section in
    tests)
      echo "== graphed vs eager grounding step"
      $PY -m pytest tests/test_grounding_graphs.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -6 ;;
    bench)
      echo "== evaluation throughput, 13b preset"
      # shellcheck disable=SC2086
      $PY bench/bench_eval_throughput.py --preset 13b --out "$OUT/bench_eval_13b.json" ${EVAL_ARGS:-} 2>&1 \
        | tee "$OUT/bench_eval_13b.log" | grep -v "^$" | tail -40 ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
