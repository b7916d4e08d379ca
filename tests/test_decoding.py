"""The shared decode path (chatterbox.model.decoding): static KV cache == recompute (== transformers'
DynamicCache, bench_chat's baseline).

Runs on the tiny model; on a CUDA machine the last test also checks that the CUDA-graph decode steps
(fused and transformers', compiled or not) give the same tokens and boxes as the eager one.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from chat_support import build_tiny_chat_model, sample_image

from bench.bench_chat import DynamicCacheDecoder, dynamic_cache_session_class
from chatterbox.model.decoding import DecodeOptions, FusedStep, KVDecoder, RecomputeDecoder, decode
from chatterbox.serve.session import ChatSession
from chatterbox.tokens import expand_image_placeholder

TEXTS = ["<image>\n What is it <bbox>? ASSISTANT:", "<image>\n Where is the dog in this picture?[VG] ASSISTANT:"]
ROUNDS = [("What is <bbox>?", [[10, 20, 100, 120]], 12), ("Where is the dog? [VG]", None, 12),
          ("Tell me more.", None, 3), ("And <bbox>? [VG]", [[0, 0, 50, 50]], 12)]


@pytest.fixture(scope="module")
def tokenizer(module_tokenizer):
    return module_tokenizer


@pytest.fixture(scope="module")
def model(module_tokenizer):
    return build_tiny_chat_model(module_tokenizer)


def batch_inputs(tokenizer):
    enc = tokenizer([expand_image_placeholder(t) for t in TEXTS], padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(3)
    return dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                images_clip=torch.randn(2, 3, 224, 224, generator=g), images_dino=torch.randn(2, 3, 128, 128, generator=g),
                image_sizes_hw=torch.tensor([[480, 640], [300, 400]]),
                region_boxes_xyxy_clip_norm=[torch.tensor([[0.1, 0.2, 0.5, 0.6]]), torch.zeros(0, 4)])


def assert_same_results(a, b):
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for x, y in zip(a, b):
        assert x.vg_in_prompt == y.vg_in_prompt
        torch.testing.assert_close(x.boxes_xyxy_abs, y.boxes_xyxy_abs, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(x.scores, y.scores, atol=1e-4, rtol=1e-4)


def test_static_cache_and_recompute_generate_the_same(model, tokenizer):
    inputs = batch_inputs(tokenizer)
    static = model.generate(**inputs, max_new_tokens=10)
    recompute = model.generate(**inputs, max_new_tokens=10, use_cache=False)
    assert all(r.token_ids for r in static)
    assert sum(len(r.boxes_xyxy_abs) for r in static) >= 1  # the prompt [VG] at least
    assert_same_results(static, recompute)


def test_sampling_is_the_same_with_and_without_the_cache(model, tokenizer):
    inputs = batch_inputs(tokenizer)
    runs = [model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, use_cache=cached,
                           generator=torch.Generator().manual_seed(7)) for cached in (True, False)]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]
    greedy = model.generate(**inputs, max_new_tokens=8)
    assert [r.token_ids for r in runs[0]] != [r.token_ids for r in greedy]  # sampling options are applied


def test_chat_rounds_with_static_and_dynamic_cache_agree(model):
    static = ChatSession(model, sample_image())
    dynamic = dynamic_cache_session_class()(model, sample_image())
    ended_by_eos = cut_by_limit = 0
    for question, boxes, max_new in ROUNDS:
        a = static.ask(question, boxes, max_new_tokens=max_new)
        b = dynamic.ask(question, boxes, max_new_tokens=max_new)
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.boxes_xyxy_abs, b.boxes_xyxy_abs, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)
        ended_by_eos += len(a.token_ids) < max_new
        cut_by_limit += len(a.token_ids) == max_new
        # The decoder holds exactly the dialogue fed so far, whatever the device ran ahead.
        assert static._decoder.length == len(static._cached_ids) == dynamic._decoder.length
    assert ended_by_eos and cut_by_limit
    assert isinstance(static._decoder, KVDecoder) and isinstance(dynamic._decoder, DynamicCacheDecoder)
    assert not static._decoder.uses_cuda_graph  # CPU: the static cache runs eagerly


def test_static_truncate_forgets_run_ahead_steps(model, tokenizer):
    """Steps fed past the end and then truncated leave no trace in later steps."""
    ids = tokenizer("USER: hello there ASSISTANT:", return_tensors="pt").input_ids
    embeds = model.causal_lm.get_input_embeddings()(ids)
    decoder = model.make_decoder(1, 32)
    hidden = decoder.prefill(embeds)
    junk = decoder.step(torch.tensor([5]))
    decoder.step(torch.tensor([6]))
    decoder.truncate(ids.shape[1])
    assert decoder.length == ids.shape[1] and int(decoder.next_position) == ids.shape[1]
    again = decoder.step(torch.tensor([9])).clone()
    reference = RecomputeDecoder(model.causal_lm, 1, "cpu")
    reference.prefill(embeds)
    torch.testing.assert_close(again, reference.step(torch.tensor([9])), atol=1e-5, rtol=1e-4)
    assert hidden.shape[1] == ids.shape[1] and not torch.allclose(junk, again)
    # Decoding never records autograd history, even when called with gradients enabled (LoRA trains).
    assert torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    assert not again.requires_grad and not decoder.cache.layers[0].keys.requires_grad


@contextmanager
def eos_always_wins(model):
    """The model's next-token logits with end-of-sequence far ahead of every other token."""
    eos = model.token_ids.eos
    original = model._next_token_logits

    def eos_always(hidden):
        logits = original(hidden)
        logits[:, eos] = 1e9
        return logits

    model._next_token_logits = eos_always
    try:
        yield
    finally:
        del model._next_token_logits


def test_min_new_tokens_and_eos_checks(model, tokenizer):
    ids = tokenizer("USER: hi ASSISTANT:", return_tensors="pt").input_ids
    embeds = model.causal_lm.get_input_embeddings()(ids)
    with eos_always_wins(model):
        decoder = model.make_decoder(1, 64)
        first = decoder.prefill(embeds)[:, -1]
        forced = decode(model, decoder, first, max_new_tokens=10, min_new_tokens=4, check_every=3)
        decoder.reset()
        first = decoder.prefill(embeds)[:, -1]
        stopped = decode(model, decoder, first, max_new_tokens=10, check_every=3)
    assert len(forced.token_ids[0]) == 4 and forced.ended_by_eos == [True] and forced.fed_tokens() == 4
    assert stopped.token_ids == [[]] and stopped.ended_by_eos == [True]
    assert stopped.steps == 3  # the device ran on until the first end-of-sequence check


def test_generate_passes_min_new_tokens_on(model, tokenizer):
    with eos_always_wins(model):
        forced = model.generate(**batch_inputs(tokenizer), max_new_tokens=8, min_new_tokens=5)
        free = model.generate(**batch_inputs(tokenizer), max_new_tokens=8)
    assert [len(r.token_ids) for r in forced] == [5, 5]
    assert [r.token_ids for r in free] == [[], []]


def test_bad_arguments_are_refused(model):
    model.decode_options = DecodeOptions(cuda_graph=True)
    try:
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
            model.make_decoder(1, 8)
    finally:
        model.decode_options = DecodeOptions()
    decoder = model.make_decoder(1, 4)
    with pytest.raises(ValueError, match="more than the static KV cache's capacity of 4"):
        decoder.prefill(torch.zeros(1, 5, model.causal_lm.config.hidden_size))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_equals_eager(tokenizer):
    """Every CUDA decode path (fused step compiled or not, transformers' step eager, graphed or compiled)
    gives the same tokens and boxes."""
    model = build_tiny_chat_model(tokenizer).cuda()
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else [t.cuda() for t in v])
              for k, v in batch_inputs(tokenizer).items()}
    eager_options = DecodeOptions(cuda_graph=False, fused_step=False)
    variants = [eager_options, DecodeOptions(fused_step=False), DecodeOptions(fused_step=False, compile_step=True),
                DecodeOptions(), DecodeOptions(compile_step=False)]
    results, chats = [], []
    for options in variants:
        model.decode_options = options
        results.append(model.generate(**inputs, max_new_tokens=12))
        chats.append(ChatSession(model, sample_image()))
    model.decode_options = DecodeOptions()
    for other in results[1:]:
        assert_same_results(results[0], other)
    assert not chats[0]._decoder.uses_cuda_graph and all(chat._decoder.uses_cuda_graph for chat in chats[1:])
    assert isinstance(chats[3]._decoder.step_kind, FusedStep) and chats[3]._decoder.step_kind.compiled
    for question, boxes, max_new in ROUNDS:
        eager, *fast = (chat.ask(question, boxes, max_new_tokens=max_new) for chat in chats)
        for reply in fast:
            assert reply.token_ids == eager.token_ids
            torch.testing.assert_close(reply.boxes_xyxy_abs, eager.boxes_xyxy_abs, atol=1e-2, rtol=1e-3)
