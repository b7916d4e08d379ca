"""bench/bench_region_encoder.py on the CPU (tiny preset): it times each variant and compares the
variants' outputs and gradients with the eager ones."""
from __future__ import annotations

import json

from tests.conftest import run_script


def test_region_encoder_benchmark_reports_times_and_agreement(tmp_path):
    out = tmp_path / "region.json"
    run_script("bench_region_encoder.py", "--preset", "tiny", "--device", "cpu", "--images", "2", "--warmup", "1",
               "--reps", "2", "--variants", "eager,cudnn_benchmark", "--json", out)
    report = json.loads(out.read_text())
    assert report["images"] == 2 and report["boxes"] == 6 and report["fwd_bwd_tflop_approx"] > 0
    assert list(report["variants"]) == ["eager", "cudnn_benchmark"]
    for entry in report["variants"].values():
        assert entry["fwd_bwd_ms"] > 0 and entry["tflops"] > 0
    # cuDNN's algorithm choice does not exist on the CPU: the same computation, bit for bit.
    assert report["variants"]["cudnn_benchmark"]["output_rel_err"] == 0.0
    assert report["variants"]["cudnn_benchmark"]["grad_rel_err"] == 0.0
