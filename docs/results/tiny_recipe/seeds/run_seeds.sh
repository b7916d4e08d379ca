#!/usr/bin/env bash
# The default quickstart with other training seeds (model init and data order; the corpus stays seed 0),
# one after another on this machine, each in its own copy of the repository.
# Usage (repo root): bash docs/results/tiny_recipe/seeds/run_seeds.sh OUT_DIR SEED...
# QUICKSTART_ARGS="--set KEY=VALUE ..." adds options to every quickstart.
set -uo pipefail
OUT=$(mkdir -p "$1" && cd "$1" && pwd); shift
for seed in "$@"; do
  copy=/tmp/seed_copies/copy_$seed; rm -rf "$copy"; mkdir -p "$copy"
  tar --exclude=./.git --exclude=./outputs --exclude=./data --exclude=./runs --exclude=./.venv -cf - . | tar -xf - -C "$copy"
  ln -s "$PWD/.venv" "$copy/.venv"
  ( cd "$copy" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$copy \
      .venv/bin/python scripts/quickstart.py --set train.seed="$seed" ${QUICKSTART_ARGS:-} > "$OUT/quickstart_seed$seed.log" 2>&1 )
  tail -1 "$OUT/quickstart_seed$seed.log" > "$OUT/quickstart_seed$seed.json"
done
