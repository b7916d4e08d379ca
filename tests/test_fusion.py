"""The image-text fusion attention (BiMultiHeadAttention): its detached softmax shifts keep the gradients
of the formula with attached shifts (as upstream writes it)."""
from __future__ import annotations

import pytest
import torch

from model.GroundingDINO.fusion import BiMultiHeadAttention


def attached_shift_forward(attn: BiMultiHeadAttention, v, l, v_padding_mask, l_padding_mask):
    """The forward with the maxima left in the autograd graph (upstream's code does so)."""
    query = attn._heads(attn.v_proj(v) * attn.scale)
    key = attn._heads(attn.l_proj(l))
    logits = query @ key.transpose(-1, -2)
    logits = (logits - logits.amax(dim=(1, 2, 3), keepdim=True)).clamp(-attn.logit_clamp, attn.logit_clamp)
    logits_l = logits.transpose(-1, -2)
    logits_l = (logits_l - logits_l.amax(dim=-1, keepdim=True)).clamp(-attn.logit_clamp, attn.logit_clamp)
    logits_l = logits_l.masked_fill(v_padding_mask[:, None, None, :], float("-inf"))
    logits = logits.masked_fill(l_padding_mask[:, None, None, :], float("-inf"))
    delta_v = attn.out_v_proj(attn._merge(logits.softmax(-1) @ attn._heads(attn.values_l_proj(l))))
    delta_l = attn.out_l_proj(attn._merge(logits_l.softmax(-1) @ attn._heads(attn.values_v_proj(v))))
    return delta_v, delta_l


@pytest.mark.parametrize("text_tokens", [1, 3])
def test_detached_shifts_give_the_attached_gradients(text_tokens):
    torch.manual_seed(0)
    attn = BiMultiHeadAttention(v_dim=16, l_dim=12, embed_dim=32, num_heads=4).double()
    for layer in (attn.v_proj, attn.l_proj, attn.values_v_proj, attn.values_l_proj):
        torch.nn.init.normal_(layer.bias)  # non-zero biases: every weight gets a gradient
    v = torch.randn(3, 20, 16, dtype=torch.float64)
    l = torch.randn(3, text_tokens, 12, dtype=torch.float64)
    v_padding_mask = torch.zeros(3, 20, dtype=torch.bool)
    v_padding_mask[1, 15:] = True
    l_padding_mask = torch.zeros(3, text_tokens, dtype=torch.bool)
    l_padding_mask[2, 1:] = True
    grad_v, grad_l = torch.randn(3, 20, 16, dtype=torch.float64), torch.randn(3, text_tokens, 12, dtype=torch.float64)
    results = []
    for forward in (attn, lambda *a: attached_shift_forward(attn, *a)):
        attn.zero_grad(set_to_none=True)
        inputs = [v.clone().requires_grad_(), l.clone().requires_grad_()]
        outputs = forward(*inputs, v_padding_mask, l_padding_mask)
        torch.autograd.backward(outputs, [grad_v, grad_l])
        results.append((outputs, {n: p.grad.clone() for n, p in attn.named_parameters()}, [x.grad for x in inputs]))
    (ours, our_grads, our_input_grads), (attached, attached_grads, attached_input_grads) = results
    for a, b in zip(ours, attached):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for name, grad in attached_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    for a, b in zip(our_input_grads, attached_input_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert attn.v_proj.weight.grad.abs().sum() > 0  # the logits path is exercised, not only the values
