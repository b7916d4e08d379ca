"""Speed knobs of the model on the tiny preset: FLOPs formula, causal-only mask, partial gradient
checkpointing, RoPE kept in fp32 under casts."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from chatterbox.model.chatterbox import ChatterBox, causal_mask_suffices
from bench.flops import llm_matmul_params, llm_step_flops
from tests.conftest import tiny_upstream_policy


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def build(tokenizer, attn: str = "sdpa", dropout: float = 0.05) -> ChatterBox:
    cfg = tiny_upstream_policy()
    cfg.language.attn_implementation = attn
    cfg.language.lora_dropout = dropout
    torch.manual_seed(0)
    model = ChatterBox.build(cfg, tokenizer=tokenizer, verbose=False)
    with torch.no_grad():  # LoRA B starts at zero: make the LoRA path matter
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)
    return model.train()


def test_matmul_parameter_count_by_hand(tokenizer):
    model = build(tokenizer)
    lang = tiny_upstream_policy().language
    h, i, L, r = lang.hidden_size, lang.intermediate_size, lang.num_hidden_layers, lang.lora_r
    counts = llm_matmul_params(model.causal_lm)
    assert counts.frozen == L * (4 * h * h + 3 * h * i)
    assert counts.trainable == L * 2 * (h * r + r * h)  # LoRA A and B on q_proj and v_proj
    assert counts.lm_head == len(tokenizer) * h and counts.lm_head_trainable
    assert (counts.num_layers, counts.hidden_size) == (L, h)


def test_flops_formula_equals_counted_matmuls(tokenizer):
    """torch's FLOP counter over a real forward+backward (eager attention counts the full, non-causal
    score matrices: the formula's causal attention term is half of that)."""
    model = build(tokenizer, attn="eager", dropout=0.0)
    counts = llm_matmul_params(model.causal_lm)
    n = 37
    embeds = torch.randn(1, n, counts.hidden_size, requires_grad=True)
    labels = torch.randint(3, 900, (1, n))
    with FlopCounterMode(display=False) as counter:
        hidden = model.causal_lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        model._lm_loss(hidden, labels).backward()
    full_attention = 12 * counts.num_layers * counts.hidden_size * n * n
    head_dim = counts.hidden_size // model.causal_lm.config.num_attention_heads
    rope_angles = 2 * (head_dim // 2) * n  # transformers forms the RoPE angles as a tiny matmul
    expected = (llm_step_flops(counts, [n]) - 6 * counts.num_layers * counts.hidden_size * n * n
                + full_attention + rope_angles)
    assert counter.get_total_flops() == expected


def test_flops_formula_rows_add_and_reject_negative():
    from bench.flops import LlmMatmulParams

    p = LlmMatmulParams(frozen=100, trainable=10, lm_head=50, lm_head_trainable=True, num_layers=2, hidden_size=8)
    one = 5 * (400 + 60) + 4 * 300 + 6 * 2 * 8 * 25
    assert llm_step_flops(p, [5]) == one
    assert llm_step_flops(p, [5, 5, 0]) == 2 * one
    assert llm_step_flops(p, [5], lm_loss=False) == one - 4 * 300  # no lm_head when the LM loss is zeroed
    with pytest.raises(ValueError):
        llm_step_flops(p, [-1])


def test_causal_mask_suffices_only_for_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert causal_mask_suffices(right) is None
    assert causal_mask_suffices(None) is None
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert causal_mask_suffices(left) is left
    holes = torch.tensor([[1, 0, 1, 0]])
    assert causal_mask_suffices(holes) is holes


def test_dropping_the_padding_mask_keeps_real_token_outputs(tokenizer):
    model = build(tokenizer, dropout=0.0).eval()
    mask = torch.tensor([[1] * 9 + [0] * 3, [1] * 12])
    embeds = torch.randn(2, 12, model.causal_lm.config.hidden_size)
    inner = model.causal_lm.model
    with torch.no_grad():
        masked = inner(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        causal = inner(inputs_embeds=embeds, attention_mask=None, use_cache=False).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(causal[real], masked[real], rtol=1e-5, atol=1e-5)


def grads_with_checkpointing(model: ChatterBox, layers: int) -> dict[str, torch.Tensor]:
    model.set_gradient_checkpointing(layers)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # same LoRA dropout masks in every run
    embeds = torch.randn(2, 10, model.causal_lm.config.hidden_size, generator=torch.Generator().manual_seed(4))
    labels = torch.randint(3, 900, (2, 10), generator=torch.Generator().manual_seed(5))
    hidden = model.causal_lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    model._lm_loss(hidden, labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_partial_gradient_checkpointing_keeps_gradients(tokenizer):
    model = build(tokenizer)
    reference = grads_with_checkpointing(model, 0)
    assert model.gradient_checkpointing_layers == 0
    for layers in (1, -1):
        grads = grads_with_checkpointing(model, layers)
        assert model.gradient_checkpointing_layers == (1 if layers == 1 else 2)
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="only 2"):
        model.set_gradient_checkpointing(3)


def test_config_sets_checkpointed_layers(tokenizer):
    cfg = tiny_upstream_policy()
    cfg.language.gradient_checkpointing = True
    cfg.language.gradient_checkpointing_layers = 1
    model = ChatterBox.build(cfg, tokenizer=tokenizer, verbose=False)
    assert [layer.gradient_checkpointing for layer in model.causal_lm.model.layers] == [True, False]


def test_rope_frequencies_stay_fp32_under_casts(tokenizer):
    model = build(tokenizer)
    rotary = model.causal_lm.model.rotary_emb
    exact = rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, exact)
    model.half()  # what DeepSpeed's fp16 engine calls
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, exact)
    assert model.causal_lm.lm_head.weight.dtype == torch.float16
