"""bench/bench_train_step.py on the CPU: batch shapes of the data contract, the checkpointing plan,
the LLaMA-shaped tokenizer stand-in, and the --tiny end-to-end run (both modes, one and three engines)."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys

import pytest
import torch

from chatterbox.model.llava_llama import check_image_layout
from chatterbox.tokens import special_token_ids
from tests.conftest import REPO_ROOT, run_script

SCRIPT = REPO_ROOT / "bench" / "bench_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_llama_shaped_tokenizer_gives_upstream_ids(bench):
    tok = bench.LlamaShapedTokenizer(32000)
    ids = special_token_ids(tok)
    assert len(tok) == 32005
    assert (ids.vg, ids.im_patch, ids.im_start, ids.im_end, ids.bbox) == (32000, 32001, 32002, 32003, 32004)
    assert (ids.bos, ids.eos, ids.pad) == (1, 2, 0)


@pytest.mark.parametrize("stream", ["grounding", "referring", "vqa"])
def test_batches_follow_the_data_contract(bench, stream):
    ids = special_token_ids(bench.LlamaShapedTokenizer(32000))
    shape = bench.STREAM_SHAPES[stream]
    batch = bench.build_batch(ids, shape, stream, 6, 32000, 224, 512 if stream == "grounding" else None,
                              torch.Generator().manual_seed(0))
    B, T = batch["input_ids"].shape
    assert B == 6 and batch["images_clip"].shape == (6, 3, 224, 224)
    assert check_image_layout(batch["input_ids"], ids, 256).tolist() == [1] * 6
    lengths = bench.row_lengths(batch)
    assert max(lengths) == T
    low, high = shape.text_tokens
    assert all(259 + low <= n <= 259 + high for n in lengths)
    for b in range(B):
        row = batch["input_ids"][b, :lengths[b]]
        assert row[0] == ids.bos and row[-1] == ids.eos
        assert (batch["input_ids"][b, lengths[b]:] == ids.pad).all()
        assert int((row == ids.bbox).sum()) == len(batch["region_boxes_xyxy_clip_norm"][b])
        assert int((row == ids.vg).sum()) == len(batch["grounding_targets_cxcywh_norm"][b])
        boxes = batch["region_boxes_xyxy_clip_norm"][b]
        assert boxes.shape[-1] == 4 and (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((boxes >= 0) & (boxes <= 1)).all()
        supervised = batch["labels"][b] != -100
        assert supervised.any() and not supervised[:259].any() and not supervised[lengths[b]:].any()
    if stream == "grounding":
        assert batch["images_dino"].shape == (6, 3, 512, 512)
        assert all(len(t) == 1 for t in batch["grounding_targets_cxcywh_norm"])  # one [VG] per sample
        assert all(len(t[0]) in shape.boxes_per_vg for t in batch["grounding_targets_cxcywh_norm"])
    else:
        assert batch["images_dino"] is None and not any(batch["grounding_targets_cxcywh_norm"])
    if stream == "referring":
        assert all(1 <= len(r) <= 4 for r in batch["region_boxes_xyxy_clip_norm"])


def test_grounding_queries_carry_the_assumed_box_counts(bench):
    ids = special_token_ids(bench.LlamaShapedTokenizer(32000))
    generator = torch.Generator().manual_seed(0)
    counts = [len(t[0]) for _ in range(40) for t in bench.build_batch(
        ids, bench.STREAM_SHAPES["grounding"], "grounding", 6, 32000, 32, 32, generator)["grounding_targets_cxcywh_norm"]]
    share = {k: counts.count(k) / len(counts) for k in set(counts)}
    assert abs(share[1] - bench.GROUNDING_BOXES_PER_QUERY[1]) < 0.08
    assert max(counts) > bench.DEVICE_MAX_TARGETS  # the graphs' eager fallback is inside the timing
    upstream = bench.build_batch(ids, bench.UPSTREAM_STREAM_SHAPES["grounding"], "grounding", 6, 32000, 32, 32, generator)
    assert bench.most_boxes_per_query(upstream) == 1  # upstream's one-hot labels take one box per query


def test_rated_peak_and_quartiles(bench):
    assert bench.rated_bf16_peak("NVIDIA H100 80GB HBM3", 770.0) == (989.4, "datasheet (H100)")
    assert bench.rated_bf16_peak("NVIDIA H100 PCIe", 500.0)[0] == 756.0
    assert bench.rated_bf16_peak("cpu", 1.5) == (1.5, "measured (no rated peak known for this device)")
    assert bench.quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_checkpoint_plan(bench):
    # 10 layers, 1000 B per token with no checkpointing -> 100 B per token and layer
    assert bench.plan_checkpoint_layers(1000, 1000, 10, free_bytes=1e6) == 0
    assert bench.plan_checkpoint_layers(1000, 1000, 10, free_bytes=0.55e6) == 5  # 1000*(500+50) B
    assert bench.plan_checkpoint_layers(1000, 1000, 10, free_bytes=1.0) == 10
    plans = [bench.plan_checkpoint_layers(t, 1000, 10, free_bytes=0.6e6) for t in (500, 1000, 2000)]
    assert plans == sorted(plans)


def test_tiny_run_compares_both_modes(tmp_path):
    out = tmp_path / "bench"
    run_script("bench_train_step.py", "--tiny", "--out", out)
    summary = json.loads((out / "bench_train_step.json").read_text())
    (ours,), (upstream,) = summary["runs"]["ours"], summary["runs"]["upstream"]
    assert (ours["engines"], upstream["engines"]) == (1, 3)
    assert ours["checkpoint_plan"] == {"grounding": 0, "referring": 0}
    assert upstream["checkpoint_plan"] == {"grounding": 2, "referring": 2}
    for res in (ours, upstream):
        assert [r["stream"] for r in res["streams"]] == ["grounding", "referring"]
        for r in res["streams"]:
            assert r["error"] is None and r["samples_per_s"] > 0 and r["mfu_step"] > 0
            assert r["tokens_per_s"] == pytest.approx(r["mean_tokens"] / r["amortised_s"])
            assert r["times_s"] and r["boundary_times_s"] and r["micro_step_s"] == statistics.median(r["times_s"])
            # --tiny: 2 timed rounds of 2 micro-steps, the last of each cycle on its own
            assert len(r["times_s"]) == len(r["boundary_times_s"]) == len(r["round_medians_s"]) == 2
            assert r["micro_step_quartiles_s"][2] == r["micro_step_s"]
    assert upstream["streams"][0]["steps_over_graph_box_limit"] == 0
    assert summary["speedup_vs_upstream"] == pytest.approx(
        summary["modes"]["ours"]["stage2_samples_per_s_median"] / summary["modes"]["upstream"]["stage2_samples_per_s_median"])
    assert "| ours #0 | grounding |" in (out / "bench_train_step.md").read_text()
    # a second comparison in the same folder reuses the processes already run
    run_script("bench_train_step.py", "--tiny", "--out", out)
    assert json.loads((out / "bench_train_step.json").read_text())["runs"] == summary["runs"]
