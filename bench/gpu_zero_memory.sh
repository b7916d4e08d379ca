#!/usr/bin/env bash
# Peak GPU memory per rank of a training stage under each ZeRO setting, on every GPU of the machine, with each
# process capped to a smaller card's memory (bench/train_capped.py), and the loss curve of each setting.
# Default: the 7B-shaped stage 2 from random weights on the synthetic corpus (configs/7b_stage2_synthetic.yaml).
# Usage (repo root, on a CUDA machine):
#   bash bench/gpu_zero_memory.sh OUT_DIR [CARD_GIB=40] [STEPS=4]
#   CONFIG=... SETS="k=v ..." SETTINGS="zero2 zero3 zero3_offload_optimizer zero3_offload_all" bash bench/gpu_zero_memory.sh ...
# Without deepspeed installed, wheels are taken from .whl_dev/ or .whl/ (scripts/carried_deepspeed.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output folder}; CARD_GIB=${2:-40}; STEPS=${3:-4}
CONFIG=${CONFIG:-configs/7b_stage2_synthetic.yaml}
SETTINGS=${SETTINGS:-zero2 zero3 zero3_offload_optimizer zero3_offload_all}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MAX_JOBS=${MAX_JOBS:-16}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # device README
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
. scripts/carried_deepspeed.sh
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; echo "GPUs: $GPUS, card emulated: $CARD_GIB GiB"
  $PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
[ -f data/synthetic/data_paths.json ] || $PY scripts/make_synthetic_data.py --out data/synthetic | tail -1
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "kernel build failed: $OUT/build.log"; exit 1; }
read -r -a EXTRA <<< "${SETS:-train.init_from=}"
for setting in $SETTINGS; do
  case $setting in
    zero2) Z=(train.zero_stage=2) ;;
    zero3) Z=(train.zero_stage=3) ;;
    zero3_offload_optimizer) Z=(train.zero_stage=3 train.offload_optimizer=true) ;;
    zero3_offload_all) Z=(train.zero_stage=3 train.offload_optimizer=true train.offload_parameters=true) ;;
    *) echo "unknown setting $setting"; exit 1 ;;
  esac
  run=outputs/zero_memory_$setting; rm -rf "$run"
  ARGS=(--config "$CONFIG" --max-steps "$STEPS" --set train.output_dir="$run")
  for kv in "${EXTRA[@]}" "${Z[@]}"; do ARGS+=(--set "$kv"); done
  echo "== $setting: ${Z[*]}"
  start=$(date +%s)
  $PY -m torch.distributed.run --standalone --nproc_per_node "$GPUS" bench/train_capped.py --card-gib "$CARD_GIB" \
    "${ARGS[@]}" > "$OUT/$setting.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start ))s"; grep -E "OutOfMemory|Error" "$OUT/$setting.log" | head -3
  cp "$run/train_summary.json" "$OUT/$setting.json" 2>/dev/null
done
$PY - "$OUT" $SETTINGS <<'PYEOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| setting | peak GiB per rank (max over ranks) | seconds per step (median) | first / last loss per stream |")
print("|---|---|---|---|")
for setting in sys.argv[2:]:
    path = out / f"{setting}.json"
    if not path.is_file():
        print(f"| {setting} | failed (see {setting}.log) | | |")
        continue
    s = json.loads(path.read_text())
    rows = s["losses"]
    streams = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/loss")})
    trend = "; ".join(f"{st} {[r[f'{st}/loss'] for r in rows if f'{st}/loss' in r][0]:.4g} / "
                      f"{[r[f'{st}/loss'] for r in rows if f'{st}/loss' in r][-1]:.4g}" for st in streams)
    step = statistics.median(r["seconds"] for r in rows)
    print(f"| {setting} | {max(s['gpu_memory_peak_gib']):.1f} | {step:.2f} | {trend} |")
PYEOF
