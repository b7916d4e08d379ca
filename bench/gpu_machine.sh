# Sourced (from the repository root, with $PY and $OUT set) by the GPU runbooks: record the card and the
# library versions in $OUT/machine.txt and build the deformable-attention kernel into the package if it is
# not there yet (the build log in $OUT/build.log).
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$OUT/machine.txt"
if ! ls model/GroundingDINO/ms_deform_attn/_C*.so >/dev/null 2>&1; then
  echo "== kernel build"
  timeout 400 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "exit $?"
fi
