"""The real-size Swin-B vision branch on a GPU (skipped without CUDA): bf16 forward + backward at 512x512
with several queries per image, and fp32 GPU vs CPU agreement on the tiny config."""
from __future__ import annotations

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
    assert len(losses) == 22 and torch.isfinite(losses["loss"])
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
