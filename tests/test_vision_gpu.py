"""The real-size Swin-B vision branch on a GPU (skipped without CUDA): bf16 forward + backward at 512x512
with several queries per image, and fp32 GPU vs CPU agreement on the tiny config."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from model.GroundingDINO import GroundingCriterion, VisionBranch, load_vision_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swinb_branch_trains_in_half_precision_on_gpu(dtype):
    torch.manual_seed(0)
    cfg = load_vision_config("swinb_cogcoor")
    branch = VisionBranch(cfg).to(device="cuda", dtype=dtype).train()
    images = torch.randn(2, 3, 512, 512, device="cuda", dtype=dtype)
    queries = (0.05 * torch.randn(3, 256, device="cuda", dtype=dtype)).requires_grad_(True)
    features = branch.forward_backbone(images)
    assert sum(h * w for h, w in (f.shape[-2:] for f in features.feature_maps)) == 64 * 64 + 32 * 32 + 16 * 16
    out = branch.forward_enc_dec(features, queries, torch.tensor([0, 1, 1], device="cuda"))
    assert out["pred_boxes"].shape == (3, 900, 4) and out["pred_logits"].dtype == dtype
    targets = [torch.tensor([[0.5, 0.5, 0.3, 0.3]], device="cuda"),
               torch.tensor([[0.2, 0.3, 0.1, 0.2], [0.7, 0.7, 0.2, 0.2]], device="cuda"),
               torch.tensor([[0.4, 0.6, 0.5, 0.4]], device="cuda")]
    losses = GroundingCriterion(cfg)(out, targets)
    # 21 weighted terms, loss_xy and loss_hw of each of the 7 layers (logged only), and "loss"
    assert len(losses) == 21 + 14 + 1 and torch.isfinite(losses["loss"])
    # Random weights give ~1e5 of loss (uncalibrated contrastive logits on 900 queries), whose unscaled
    # gradients exceed fp16's range; fp16 training scales the loss (DeepSpeed's dynamic loss scaler).
    scale = 2.0**-10 if dtype == torch.float16 else 1.0
    (losses["loss"] * scale).backward()
    assert torch.isfinite(queries.grad).all() and queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in branch.backbone.parameters())


def test_tiny_branch_agrees_between_gpu_and_cpu():
    # float64 on both devices: in float32 the encoder's top-k proposal selection can break near-ties
    # differently on the two devices, which swaps whole query slots; in float64 no tie is that close.
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_vision_config("tiny"))
    branch = VisionBranch(cfg).double().eval()
    images, queries = torch.randn(2, 3, 128, 128).double(), 0.1 * torch.randn(3, cfg.hidden_dim).double()
    index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        cpu = branch(images, queries, index)
        gpu = branch.cuda()(images.cuda(), queries.cuda(), index.cuda())
    torch.testing.assert_close(gpu["pred_boxes"].cpu(), cpu["pred_boxes"], atol=1e-5, rtol=1e-5)  # boxes are kept in fp32
    torch.testing.assert_close(gpu["pred_logits"].cpu(), cpu["pred_logits"], atol=1e-6, rtol=1e-6)


def test_compiled_fusion_layer_has_finite_accurate_gradients_in_bf16():
    # The 13b grounding shape (9 queries, 5,440 image tokens, one text token per query), where the layer
    # compiled by inductor gave non-finite gradients while the softmax shifts were in the autograd graph.
    from model.GroundingDINO.fusion import BiAttentionBlock

    torch.manual_seed(0)
    # Weights and inputs in bf16 from the start, so that the fp64 reference computes the same function.
    block = BiAttentionBlock(256, 256, 1024, 4, drop_path=0.0).cuda().bfloat16()
    v = torch.randn(9, 5440, 256, device="cuda", dtype=torch.bfloat16)
    l = torch.randn(9, 1, 256, device="cuda", dtype=torch.bfloat16)
    v_padding_mask = torch.zeros(9, 5440, dtype=torch.bool, device="cuda")
    v_padding_mask[4:, 5000:] = True
    grad_v, grad_l = torch.randn_like(v), torch.randn_like(l)

    def gradients(module, dtype):
        module.zero_grad(set_to_none=True)
        inputs = [v.to(dtype).clone().requires_grad_(), l.to(dtype).clone().requires_grad_()]
        torch.autograd.backward(module(*inputs, v_padding_mask, None), [grad_v.to(dtype), grad_l.to(dtype)])
        grads = {n.removeprefix("_orig_mod."): p.grad.double() for n, p in module.named_parameters()}
        grads.update(input_v=inputs[0].grad.double(), input_l=inputs[1].grad.double())
        return grads

    reference = gradients(copy.deepcopy(block).double(), torch.float64)
    compiled = torch.compile(block)
    gradients(compiled, torch.bfloat16)  # compiles
    grads = gradients(compiled, torch.bfloat16)
    assert [n for n, g in grads.items() if not torch.isfinite(g).all()] == []
    for name, ref in reference.items():
        if ref.norm() > 1e-8:  # v_proj's bias has a zero true gradient (a softmax shift)
            assert (grads[name] - ref).norm() / ref.norm() < 2e-2, name
    torch._dynamo.reset()
