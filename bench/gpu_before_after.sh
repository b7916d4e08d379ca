#!/usr/bin/env bash
# Same-call before/after timing of two code states on one GPU: the 13b chat decode (bench_chat.py) and the
# 13b stage-2 training step (bench_train_step.py --mode ours), alternating before, after, before, after.
# Usage (repo root, on a CUDA machine):
#   BEFORE_TREE=path bash bench/gpu_before_after.sh OUT_DIR [chat|train|tests]...
# BEFORE_TREE holds the older commit's files (`git archive <rev> chatterbox model scripts setup.py configs
# | tar -x -C path`); its bench scripts may sit in scripts/ (before they moved to bench/). The kernel is
# built once here and copied into it, so both states run the same deformable-attention build.
# Environment: REPS (alternations, default 2), CHAT_ARGS / TRAIN_ARGS (extra flags of the two benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: BEFORE_TREE=path bash bench/gpu_before_after.sh OUT_DIR [chat|train|tests]...}; shift
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BEFORE=$(cd "${BEFORE_TREE:?set BEFORE_TREE}" && pwd)
SECTIONS=${*:-chat train}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MAX_JOBS=${MAX_JOBS:-16}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
. scripts/carried_deepspeed.sh
. bench/gpu_machine.sh
cp model/GroundingDINO/ms_deform_attn/_C*.so "$BEFORE/model/GroundingDINO/ms_deform_attn/"

script() {  # tree, name: that tree's copy of a bench script
  if [ -f "$1/bench/$2" ]; then echo "$1/bench/$2"; else echo "$1/scripts/$2"; fi
}

for section in $SECTIONS; do
  case $section in
    tests)
      echo "== GPU tests"
      $PY -m pytest tests/test_model_gpu.py tests/test_grounding_graphs.py -q -rs -p no:cacheprovider 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -8 ;;
    chat|train)
      for rep in $(seq 1 "${REPS:-2}"); do
        for state in before after; do
          tree=$PWD; [ $state = before ] && tree=$BEFORE
          name=${section}_${state}_$rep
          start=$(date +%s)
          if [ $section = chat ]; then
            (cd "$tree" && timeout 280 $PY "$(script "$tree" bench_chat.py)" --preset 13b --no-baseline \
              --out "$OUT/$name.json" ${CHAT_ARGS:-} > "$OUT/$name.log" 2>&1)
          else
            (cd "$tree" && timeout 400 $PY "$(script "$tree" bench_train_step.py)" --mode ours \
              --json "$OUT/$name.json" ${TRAIN_ARGS:-} > "$OUT/$name.log" 2>&1)
          fi
          echo "$name: exit $? in $(( $(date +%s) - start )) s"
          grep -E "tokens/s|samples/s|Error" "$OUT/$name.log" | tail -4
        done
      done ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
