"""bench/check_compiled_step.py on the CPU: compiled blocks (aot_eager) give the eager step's losses and
gradients in fp32, and the report names non-finite gradients (none here)."""
from __future__ import annotations

import json

from tests.conftest import run_script


def test_tiny_compiled_step_matches_eager_in_fp32(tmp_path):
    out = tmp_path / "check.json"
    run_script("check_compiled_step.py", "--preset", "tiny", "--device", "cpu", "--micro-batch", "2", "--dtype", "fp32",
               "--backend", "aot_eager", "--variants", "eager,all,fusion", "--json", out, timeout=600)
    report = json.loads(out.read_text())
    assert list(report) == ["eager", "all", "fusion"]
    eager = report["eager"]["losses"]
    assert eager["grounding_loss"] > 0 and eager["lm_loss"] == 0  # a grounding batch: LM loss zeroed
    for variant in ("all", "fusion"):
        entry = report[variant]
        assert entry["non_finite_grads"] == 0 and entry["non_finite_names"] == []
        for key, value in entry["losses"].items():
            assert abs(value - eager[key]) <= 1e-4 * max(abs(eager[key]), 1.0), (variant, key)
        assert set(entry["relative_grad_error"]) >= {"language_model", "vision_branch"}
        assert all(error < 1e-3 for error in entry["relative_grad_error"].values()), (variant, entry)
