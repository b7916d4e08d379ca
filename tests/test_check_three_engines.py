"""bench/check_three_engines.py on the CPU (fp32, a small model): the gradient-hook calls of every engine
are counted per backward, and training through the last engine updates the weights."""
from __future__ import annotations

import json

from tests.conftest import run_script


def test_each_engines_hook_calls_are_counted(tmp_path):
    out = tmp_path / "three.json"
    run_script("check_three_engines.py", "--device", "cpu", "--precision", "fp32", "--width", "64", "--parameters",
               "20000", "--engines", "3", "--gas", "2", "--cycles", "1", "--json", out)
    result = json.loads(out.read_text())
    weights_and_biases = 2 * round(20000 / (64 * 64 + 64))
    assert result["trainable_parameters"] == weights_and_biases // 2 * (64 * 64 + 64)
    assert result["error"] is None and result["weights_changed"] and result["micro_step_s"] > 0
    # four micro-steps (2 x (1 + 1 cycles)); this DeepSpeed hooks the parameters themselves, so the hooks of
    # all three engines fire on the last engine's backward
    assert result["hook_calls_per_backward"] == [[weights_and_biases] * 3] * 4
