# Sourced (from the repository root, with $PY set) by the GPU runbooks: when deepspeed is not importable,
# install the wheels carried to the machine (.whl_dev/, else .whl/; the device machines reach no package
# index) into /tmp/site and put it on PYTHONPATH; stop the runbook when there are none.
if ! $PY -c "import deepspeed" 2>/dev/null; then
  wheels=$(ls .whl_dev/*.whl 2>/dev/null || ls .whl/*.whl 2>/dev/null)
  [ -n "$wheels" ] || { echo "deepspeed is not installed and there is no .whl_dev/ or .whl/ folder of wheels"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
