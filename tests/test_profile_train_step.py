"""scripts/profile_train_step.py on the CPU (--tiny): both parts are timed and profiled, and the
forward and backward work is charged to the named stages of the model."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "profile_train_step.py"


def test_tiny_profile_attributes_work_to_stages(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "profile_ours-uncompiled_grounding.json").read_text())
    assert result["queries_per_batch"] and result["queries_per_batch"][0] > 0
    vision, step = result["vision_alone"], result["step"]
    for part in (vision, step):
        assert part["median_s"] > 0 and part["top_cpu"] and "stages_error" not in part
        assert all(row["self_cpu_ms_per_step"] >= 0 for row in part["top_cpu"])
    # the vision branch alone has only vision stages, forward and backward
    assert {"vision.backbone", "vision.encoder.fusion", "vision.decoder.layer", "vision.matcher",
            "vision.criterion"} <= set(vision["stages"])
    assert {"bwd:vision.decoder.layer", "bwd:vision.encoder.fusion"} <= set(vision["stages"])
    assert not any(s.removeprefix("bwd:").startswith("llm") for s in vision["stages"])
    # the training step adds the LLM and the engine's calls
    assert {"llm.decoder", "bwd:llm.decoder", "step.backward", "vision.matcher"} <= set(step["stages"])
    assert step["stages"]["vision.backbone"]["cpu_ms"] > 0
    assert step["sync_sites"]["note"].startswith("CPU run")
    report = (tmp_path / "profile_ours-uncompiled_grounding.md").read_text()
    assert "## Vision branch alone" in report and "| vision.matcher |" in report
