"""Mixture ratios, determinism, resume, rank sharding, stream resume and the stage-2 cadence."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from chatterbox.data.config import DataConfig
from chatterbox.data.mixtures import STAGE2_CADENCE, Mixture, MixtureSampler, streams_due
from chatterbox.data.streams import build_stream

from data_support import synthetic_data_config


def _sampler(weights, seed=0, rank=0, world_size=1, stream="grounding"):
    mixture = Mixture.from_weights(weights)
    return MixtureSampler(mixture, {n: 50 + i for i, n in enumerate(mixture.names)}, seed, stream, rank, world_size)


@pytest.mark.parametrize("task", ["grounding", "referring", "vqa"])
def test_upstream_mixture_ratios_over_10k_draws(task):
    weights = getattr(DataConfig(), f"{task}_mixture")
    draws = list(itertools.islice(iter(_sampler(weights, stream=task)), 10_000))
    counts = Counter(k.source for k in draws)
    total = sum(weights.values())
    for name, weight in weights.items():
        assert abs(counts[name] / 10_000 - weight / total) < 0.02, (name, counts[name])
    assert all(0 <= k.record_index < 50 + sorted(weights).index(k.source) for k in draws)


def test_sampler_is_deterministic_and_resumes():
    weights = DataConfig().referring_mixture
    a = _sampler(weights, seed=3)
    first = list(itertools.islice(iter(a), 300))
    assert first == list(itertools.islice(iter(_sampler(weights, seed=3)), 300))
    assert first != list(itertools.islice(iter(_sampler(weights, seed=4)), 300))
    b = _sampler(weights, seed=3)
    list(itertools.islice(iter(b), 120))
    state = b.state_dict()
    c = _sampler(weights, seed=3)
    c.load_state_dict(state)
    assert list(itertools.islice(iter(c), 180)) == first[120:]
    with pytest.raises(ValueError, match="seed"):
        _sampler(weights, seed=5).load_state_dict(state)


def test_ranks_take_disjoint_interleaved_draws():
    weights = DataConfig().grounding_mixture
    single = list(itertools.islice(iter(_sampler(weights)), 40))
    shards = [list(itertools.islice(iter(_sampler(weights, rank=r, world_size=4)), 10)) for r in range(4)]
    merged = sorted((k for shard in shards for k in shard), key=lambda k: k.draw_index)
    assert merged == single
    assert all(k.draw_index % 4 == r for r, shard in enumerate(shards) for k in shard)


def test_stage2_cadence():
    per_ten = Counter(s for step in range(10) for s in streams_due(step, STAGE2_CADENCE))
    assert per_ten == {"referring": 1, "grounding": 10, "vqa": 2}
    assert streams_due(0, STAGE2_CADENCE) == ["referring", "grounding", "vqa"]
    assert streams_due(3, STAGE2_CADENCE) == ["grounding"]
    assert streams_due(5, STAGE2_CADENCE) == ["grounding", "vqa"]


def test_stream_resume_yields_the_same_batches(tiny_tokenizer):
    cfg = synthetic_data_config()
    stream = build_stream(cfg, "grounding", tiny_tokenizer, batch_size=2, seed=7, num_workers=0)
    batches = [next(stream) for _ in range(4)]
    resumed = build_stream(cfg, "grounding", tiny_tokenizer, batch_size=2, seed=7, num_workers=0)
    state_after_two = {**stream.state_dict(), "position": 4}
    resumed.load_state_dict(state_after_two)
    for expected in batches[2:]:
        got = next(resumed)
        assert got["sample_ids"] == expected["sample_ids"]
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["images_dino"], expected["images_dino"])
    assert stream.state_dict()["position"] == 8


def test_stream_with_workers_matches_single_process(tiny_tokenizer):
    cfg = synthetic_data_config()
    plain = build_stream(cfg, "referring", tiny_tokenizer, batch_size=2, seed=1, num_workers=0)
    workers = build_stream(cfg, "referring", tiny_tokenizer, batch_size=2, seed=1, num_workers=2)
    for _ in range(3):
        a, b = next(plain), next(workers)
        assert a["sample_ids"] == b["sample_ids"]
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert all(torch.equal(x, y)
                   for x, y in zip(a["region_boxes_xyxy_clip_norm"], b["region_boxes_xyxy_clip_norm"]))
    assert workers.state_dict()["position"] == 6  # samples handed out, not prefetched


def test_missing_path_for_weighted_source_is_named():
    cfg = DataConfig()
    from chatterbox.data.errors import DataError
    from chatterbox.data.streams import load_stream_sources
    with pytest.raises(DataError, match="cb_materials_dir"):
        load_stream_sources(cfg, "grounding")


def test_stream_resumed_on_another_world_size_continues_after_every_old_draw(tiny_tokenizer):
    """Two ranks drew 3 batches of 2 each; one rank resumes with the next 12 draws, none skipped or repeated."""
    cfg = synthetic_data_config()
    old = [build_stream(cfg, "grounding", tiny_tokenizer, batch_size=2, seed=7, rank=r, world_size=2,
                        num_workers=0) for r in range(2)]
    for _ in range(3):
        for stream in old:
            next(stream)
    resumed = build_stream(cfg, "grounding", tiny_tokenizer, batch_size=2, seed=7, num_workers=0)
    resumed.load_state_dict(old[0].state_dict(), reshard=True)
    reference = build_stream(cfg, "grounding", tiny_tokenizer, batch_size=2, seed=7, num_workers=0)
    reference.load_state_dict({**reference.state_dict(), "position": 12})  # one rank that drew all 12
    for _ in range(2):
        assert next(resumed)["sample_ids"] == next(reference)["sample_ids"]


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 3), (3, 2)])
def test_sampler_reshards_to_another_world_size_without_repeating_or_skipping_draws(old_world, new_world):
    weights = {"a": 1.0, "b": 3.0}
    old = [_sampler(weights, seed=3, rank=r, world_size=old_world) for r in range(old_world)]
    seen = [next(iter(s)).draw_index for _ in range(5) for s in old]  # lockstep: 5 draws per rank
    state = old[0].state_dict()
    new = [_sampler(weights, seed=3, rank=r, world_size=new_world) for r in range(new_world)]
    for s in new:
        s.load_state_dict(state, reshard=True)
    iters = [iter(s) for s in new]
    later = [next(it).draw_index for _ in range(4) for it in iters]
    assert sorted(seen + later) == list(range(5 * old_world + 4 * new_world))
    with pytest.raises(ValueError, match="world_size"):
        _sampler(weights, seed=3, rank=0, world_size=new_world).load_state_dict(state)
