#!/usr/bin/env bash
# Set up (idempotent), then run the main job on the tiny preset on the CPU: synthetic data, stage 1,
# stage 2, evaluation. The last line printed is a JSON summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/quickstart.py "$@"
