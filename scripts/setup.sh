#!/usr/bin/env bash
# Create .venv and install ChatterBox with everything it needs. Safe to run again: a finished
# install is detected by a stamp holding the hash of requirements.txt and setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v java >/dev/null 2>&1; then
  # pycocoevalcap's METEOR scorer and PTB tokenizer are Java programs.
  echo "[setup] installing a Java runtime (needed by the METEOR scorer)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq default-jre-headless >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.chatterbox-installed"
want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

echo "[setup] installing requirements (first run takes several minutes: torch is large)"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel "setuptools<81"
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done"
