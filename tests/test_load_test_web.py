"""bench/load_test_web.py on the CPU: simulated users chat with the demo at once; every round is answered
and its latency and wait reported."""
from __future__ import annotations

import json

from tests.conftest import run_script


def test_load_test_reports_latency_per_round_and_user_count(tmp_path):
    out = tmp_path / "load.json"
    run_script("load_test_web.py", "--users", "1", "3", "--rounds", "2", "--set", "chat.max_new_tokens=4",
               "--out", out)
    report = json.loads(out.read_text())
    assert [r["users"] for r in report["results"]] == [1, 3]
    for result in report["results"]:
        assert len(result["rounds"]) == result["users"] and all(len(u) == 2 for u in result["rounds"])
        assert set(result["by_round"]) == {"1", "2"}
        assert 0 < result["latency_p50_s"] <= result["latency_p95_s"]
        assert all(0 <= r["waited_s"] <= r["latency_s"] and r["tokens"] <= 4 for u in result["rounds"] for r in u)
    assert report["results"][0]["waited_mean_s"] < 0.05  # one user never waits for another
