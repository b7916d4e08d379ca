"""bench/profile_train_step.py on the CPU (--tiny): both parts are timed and profiled, the forward and
backward work is charged to the named stages of the model, and compiled blocks are profiled without
recompiling."""
from __future__ import annotations

import json

from tests.conftest import run_script


def test_tiny_profile_attributes_work_to_stages(tmp_path):
    run_script("profile_train_step.py", "--tiny", "--mode", "ours-uncompiled", "--out", tmp_path)
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


def test_tiny_profile_of_compiled_blocks_does_not_recompile(tmp_path):
    # aot_eager traces as inductor would (dynamo guards included) without needing a C++ compiler.
    run_script("profile_train_step.py", "--tiny", "--mode", "ours", "--compile-backend", "aot_eager", "--out", tmp_path)
    result = json.loads((tmp_path / "profile_ours_grounding.json").read_text())
    vision, step = result["vision_alone"], result["step"]
    assert vision["graphs_compiled_while_profiling"] == 0 and step["graphs_compiled_while_profiling"] == 0
    # Compiled layers carry no range of their own; their work lands in the enclosing stages.
    assert "vision.decoder.layer" not in vision["stages"] and "vision.encoder.deformable_layer" not in vision["stages"]
    assert {"vision.decoder", "bwd:vision.decoder", "vision.encoder.fusion"} <= set(vision["stages"])
    assert {"llm.decoder", "bwd:llm.decoder", "step.backward"} <= set(step["stages"])
