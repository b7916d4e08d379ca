#!/usr/bin/env bash
# Create .venv and install ChatterBox with everything it needs. Safe to run again: a finished
# install is detected by a stamp holding the hash of requirements.txt and setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# System packages: a Java runtime for pycocoevalcap's METEOR scorer and PTB tokenizer, and Chromium +
# ChromeDriver for the web demo's browser test (CHATTERBOX_SKIP_BROWSER=1 skips those).
apt_packages=()
command -v java >/dev/null 2>&1 || apt_packages+=(default-jre-headless)
if [ "${CHATTERBOX_SKIP_BROWSER:-0}" != 1 ]; then
  command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || apt_packages+=(chromium-driver)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${apt_packages[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.chatterbox-installed"
want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  # The package is installed in editable mode: a venv shared with (or copied from) another checkout imports
  # that checkout's code and configs from scripts outside the repository root (evaluation/*.py).
  # (-I: neither the current folder nor PYTHONPATH, only what the venv itself imports)
  installed=$("$VENV/bin/python" -I -c "import chatterbox, os; print(os.path.dirname(os.path.dirname(os.path.realpath(chatterbox.__file__))))" 2>/dev/null || true)
  if [ "$installed" != "$ROOT" ]; then
    echo "[setup] $VENV imports chatterbox from ${installed:-nowhere}: installing this checkout ($ROOT)"
    "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
  fi
  echo "[setup] $VENV is up to date"
  exit 0
fi

echo "[setup] installing requirements (first run takes several minutes: torch is large)"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel "setuptools<81"
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done"
