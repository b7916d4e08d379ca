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
        assert all(1 <= len(t) <= 2 for t in batch["grounding_targets_cxcywh_norm"])
    else:
        assert batch["images_dino"] is None and not any(batch["grounding_targets_cxcywh_norm"])
    if stream == "referring":
        assert all(1 <= len(r) <= 4 for r in batch["region_boxes_xyxy_clip_norm"])


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
    ours, upstream = summary["results"]["ours"], summary["results"]["upstream"]
    assert (ours["engines"], upstream["engines"]) == (1, 3)
    assert ours["checkpoint_plan"] == {"grounding": 0, "referring": 0}
    assert upstream["checkpoint_plan"] == {"grounding": 2, "referring": 2}
    for res in (ours, upstream):
        assert [r["stream"] for r in res["streams"]] == ["grounding", "referring"]
        for r in res["streams"]:
            assert r["error"] is None and r["samples_per_s"] > 0 and r["mfu_step"] > 0
            assert r["tokens_per_s"] == pytest.approx(r["mean_tokens"] / r["amortised_s"])
            assert r["times_s"] and r["boundary_times_s"] and r["micro_step_s"] == statistics.median(r["times_s"])
    assert summary["speedup_samples_per_s"] > 0
    assert "| ours | grounding |" in (out / "bench_train_step.md").read_text()
