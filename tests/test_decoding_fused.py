"""The fused decode step (chatterbox.model.fast_decode) == transformers' step, on the tiny model (CPU).

Covers the fused-weight views (no copy, names and values kept), LoRA unmerged (with non-zero B) and
merged, left padding, attention buckets (steps cross several), truncation, bf16, generate and chat
rounds against transformers' step, and the fallback for LLMs the fused step does not support.
"""
from __future__ import annotations

import pytest
import torch
from chat_support import build_tiny_chat_model, sample_image
from transformers import LlamaConfig, LlamaForCausalLM

from chatterbox.model.decoding import (DecodeOptions, FusedStep, KVDecoder, TransformersStep, attention_buckets,
                                       make_kv_decoder)
from chatterbox.model.fast_decode import fuse_projection_weights, unsupported_reason
from bench.bench_chat import reencoding_session_class
from chatterbox.serve.session import ChatSession

# Left padding in row 0; 14 steps from 7 columns cross the buckets (4, 8, 12, 16, 20, 24) of width 4.
PADDING_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
STEPS = 14


@pytest.fixture(scope="module")
def model(module_tokenizer):
    """The tiny model with non-zero LoRA B matrices (peft starts them at zero, which would hide LoRA)."""
    model = build_tiny_chat_model(module_tokenizer)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.causal_lm.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def run_steps(decoder, embeds, padding_mask, steps=STEPS, tokens_from=5):
    """Prefill, then ``steps`` steps; returns the prefill and each step's hidden states."""
    hidden = [decoder.prefill(embeds, padding_mask)]
    for t in range(steps):
        hidden.append(decoder.step(torch.tensor([tokens_from + t, tokens_from + 2 * t])).clone())
    return hidden


def fused_decoder(lm, capacity, device, dtype, compile=False, cuda_graph=None):
    return KVDecoder(lm, 2, capacity, device, dtype, cuda_graph,
                     lambda decoder: FusedStep(decoder, compile=compile, bucket_width=4))


def both_decoders(lm, dtype=torch.float32, capacity=24):
    fused = fused_decoder(lm, capacity, torch.device("cpu"), dtype)
    reference = make_kv_decoder(lm, 2, capacity, "cpu", dtype, DecodeOptions(fused_step=False))
    assert type(reference.step_kind) is TransformersStep
    return fused, reference


def random_embeds(lm, dtype=torch.float32):
    return torch.randn(2, PADDING_MASK.shape[1], lm.config.hidden_size,
                       generator=torch.Generator().manual_seed(1)).to(dtype)


def test_fused_weights_are_views_of_one_tensor(model):
    lm = model.causal_lm
    before = {name: p.detach().clone() for name, p in lm.named_parameters()}
    fused = fuse_projection_weights(lm)
    after = dict(lm.named_parameters())
    assert list(after) == list(before)  # same names, same order
    for name, value in before.items():
        torch.testing.assert_close(after[name].detach(), value, rtol=0, atol=0)
    attn, mlp = lm.model.layers[0].self_attn, lm.model.layers[0].mlp
    qkv, gate_up = fused[0]
    q, k, v = (getattr(m, "base_layer", m).weight for m in (attn.q_proj, attn.k_proj, attn.v_proj))  # q, v: LoRA
    assert qkv.data_ptr() == q.data_ptr() and k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    assert qkv.untyped_storage().nbytes() == (q.numel() + k.numel() + v.numel()) * q.element_size()  # no spare copy
    assert gate_up.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    # Fusing again re-uses the views; in-place updates (peft's merge, optimizers) reach the fused tensor.
    assert fuse_projection_weights(lm)[0][0].data_ptr() == qkv.data_ptr()
    with torch.no_grad():
        k.add_(1.0)
        assert torch.equal(qkv[q.shape[0]:q.shape[0] + k.shape[0]], k)
        k.sub_(1.0)
    # A weight replaced wholesale (a .to(), a safe merge) is fused again, with its current values.
    replacement = (k.detach() * 2).clone()
    k.data = replacement
    refused = fuse_projection_weights(lm)[0][0]
    assert torch.equal(refused[q.shape[0]:q.shape[0] + k.shape[0]], replacement)
    assert k.data_ptr() == refused.data_ptr() + q.numel() * q.element_size()
    with torch.no_grad():
        k.copy_(before[[n for n, p in after.items() if p is k][0]])


@pytest.mark.parametrize("lora", ["unmerged", "merged"])
def test_fused_steps_equal_transformers_steps(model, lora):
    lm = model.causal_lm
    if lora == "merged":
        model.language_model.merge_adapter()
    try:
        fused, reference = both_decoders(lm)
        layer = fused.step_kind.fused.layers[0]
        assert layer.q_adapters if lora == "unmerged" else not layer.q_adapters
        embeds = random_embeds(lm)
        got, want = run_steps(fused, embeds, PADDING_MASK), run_steps(reference, embeds, PADDING_MASK)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        assert fused.length == reference.length == PADDING_MASK.shape[1] + STEPS
        assert torch.equal(fused.next_position, reference.next_position)
        # After truncating run-ahead steps, later steps match again (rounds of a chat session).
        for decoder in (fused, reference):
            decoder.truncate(PADDING_MASK.shape[1] + 3)
        got, want = run_steps(fused, embeds[:, :2], None, 5, 40), run_steps(reference, embeds[:, :2], None, 5, 40)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    finally:
        if lora == "merged":
            model.language_model.unmerge_adapter()


def test_fused_step_reads_only_its_bucket(model):
    """Columns beyond the step's bucket are never read: NaNs there change nothing."""
    lm = model.causal_lm
    fused, reference = both_decoders(lm)
    embeds = random_embeds(lm)
    fused.prefill(embeds, PADDING_MASK)
    reference.prefill(embeds, PADDING_MASK)
    bucket = fused._bucket(fused.length + 1)
    assert bucket == 8 and fused.attention_buckets == attention_buckets(24, 4) == (4, 8, 12, 16, 20, 24)
    for layer in fused.cache.layers:
        layer.keys[:, :, bucket:] = float("nan")
        layer.values[:, :, bucket:] = float("nan")
    tokens = torch.tensor([7, 8])
    torch.testing.assert_close(fused.step(tokens), reference.step(tokens), atol=2e-5, rtol=1e-5)


def test_fused_step_in_bf16_is_close(module_tokenizer):
    model = build_tiny_chat_model(module_tokenizer)
    lm = model.causal_lm.to(torch.bfloat16)
    fused, reference = both_decoders(lm, torch.bfloat16)
    embeds = random_embeds(lm, torch.bfloat16)
    got, want = run_steps(fused, embeds, PADDING_MASK, 6), run_steps(reference, embeds, PADDING_MASK, 6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02)


def test_generate_and_chat_equal_transformers_step(model, module_tokenizer):
    from test_decoding import ROUNDS, assert_same_results, batch_inputs

    inputs = batch_inputs(module_tokenizer)
    fused = model.generate(**inputs, max_new_tokens=10)
    chats = [ChatSession(model, sample_image()), reencoding_session_class()(model, sample_image())]
    model.decode_options = DecodeOptions(fused_step=False)
    try:
        reference = model.generate(**inputs, max_new_tokens=10)
        chats.append(ChatSession(model, sample_image()))
        chats[-1]._decoder_for(chats[-1].max_context)  # built now, with these options
    finally:
        model.decode_options = DecodeOptions()
    assert all(r.token_ids for r in fused)
    assert_same_results(fused, reference)
    for question, boxes, max_new in ROUNDS:
        replies = [chat.ask(question, boxes, max_new_tokens=max_new) for chat in chats]
        for reply in replies[1:]:
            assert reply.token_ids == replies[0].token_ids
            torch.testing.assert_close(reply.boxes_xyxy_abs, replies[0].boxes_xyxy_abs, atol=1e-3, rtol=1e-4)
    assert [type(chat._decoder.step_kind) for chat in chats] == [FusedStep, FusedStep, TransformersStep]


def test_unsupported_llm_falls_back_to_transformers_step():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    lm = LlamaForCausalLM(config).eval()
    assert "biases" in unsupported_reason(lm)
    assert type(make_kv_decoder(lm, 1, 16, "cpu").step_kind) is TransformersStep
    with pytest.raises(ValueError, match="fused_step=True, but the fused decode step does not support this LLM"):
        make_kv_decoder(lm, 1, 16, "cpu", options=DecodeOptions(fused_step=True))


def test_grouped_query_attention_matches():
    """Fewer key/value heads than query heads (LLaMA-2-70B style)."""
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    lm = LlamaForCausalLM(config).eval()
    assert unsupported_reason(lm) is None
    fused, reference = both_decoders(lm)
    embeds = random_embeds(lm)
    for a, b in zip(run_steps(fused, embeds, PADDING_MASK), run_steps(reference, embeds, PADDING_MASK)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_graphs_equal_transformers_steps(module_tokenizer, dtype):
    """Compiled fused steps replayed from one CUDA graph per bucket == transformers' eager steps."""
    model = build_tiny_chat_model(module_tokenizer)
    lm = model.causal_lm.to("cuda", dtype)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)
    device = torch.device("cuda")
    fused = fused_decoder(lm, 24, device, dtype, compile=True)
    reference = make_kv_decoder(lm, 2, 24, device, dtype, DecodeOptions(cuda_graph=False, fused_step=False))
    embeds = random_embeds(lm, dtype).cuda()
    got, want = run_steps(fused, embeds, PADDING_MASK.cuda()), run_steps(reference, embeds, PADDING_MASK.cuda())
    assert fused.uses_cuda_graph and sorted(fused._graphs) == [8, 12, 16, 20, 24]  # steps at 7..20 columns
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)
