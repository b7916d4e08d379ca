"""bench/bench_eval_throughput.py on the CPU (tiny preset): the runners' path per batch size, every reply
forced to the stated length, and a time split whose parts add up to the batch."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_script


def test_eval_throughput_benchmark_times_the_runner_per_batch_size(tmp_path):
    out = tmp_path / "eval.json"
    run_script("bench_eval_throughput.py", "--preset", "tiny", "--device", "cpu", "--questions", "6",
               "--batch-sizes", "1", "4", "--repeats", "2", "--answer-tokens", "3", "--serial-too", "--out", out)
    report = json.loads(out.read_text())
    assert set(report["benchmarks"]) == {"grounding", "grounding_box_only", "referring"}
    for name, result in report["benchmarks"].items():
        tokens = 1 if name == "grounding_box_only" else 3
        assert result["answer_tokens"] == tokens and result["questions"] == 6
        assert [(row["images"], row["batch_size"]) for row in result["by_batch_size"]] == [
            ("prefetch", 1), ("prefetch", 4), ("serial", 1), ("serial", 4)]
        for row in result["by_batch_size"]:
            assert len(row["runs"]) == 2 and row["questions_per_s_median"] > 0
            assert all(run["generated_tokens_min_max"] == [tokens, tokens] for run in row["runs"])
        split = result["time_split_s_at_largest_batch"]
        parts = sum(v for k, v in split.items() if k != "whole_batch")
        assert parts == pytest.approx(split["whole_batch"]) and split["llm_prefill"] > 0
