#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on the CPU. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
# One worker per core, each test file on one worker (module-scoped models are built once); TEST_WORKERS=0 runs
# the suite in this process.
.venv/bin/python -m pytest tests -q -p no:cacheprovider -n "${TEST_WORKERS:-auto}" --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: no tests ran — treating as a failure" >&2
  exit 1
fi
exit "$rc"
