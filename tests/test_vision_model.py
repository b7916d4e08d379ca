"""The vision branch end to end on the tiny config (CPU): shapes, dtypes, gradients, several queries
per image, padding masks, and the best-box decoding rule."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model.GroundingDINO import GroundingCriterion, VisionBranch, load_vision_config, select_best_boxes
from model.GroundingDINO.backbone import SinePositionEncoding


@pytest.fixture(scope="module")
def cfg():
    return load_vision_config("tiny")


@pytest.fixture(scope="module")
def branch(cfg):
    torch.manual_seed(0)
    return VisionBranch(cfg).eval()


def _images(batch=2, h=128, w=128, seed=1):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _queries(n, dim, seed=2):
    return 0.1 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_backbone_levels_strides_and_positions(branch, cfg):
    feats = branch.forward_backbone(_images(h=128, w=96))
    assert [tuple(f.shape) for f in feats.feature_maps] == [(2, 32, 16, 12), (2, 64, 8, 6), (2, 128, 4, 3)]
    assert [tuple(m.shape) for m in feats.masks] == [(2, 16, 12), (2, 8, 6), (2, 4, 3)]
    assert all(p.shape[1] == cfg.hidden_dim for p in feats.positions)
    assert not any(m.any() for m in feats.masks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes_through_the_branch(cfg, dtype):
    torch.manual_seed(0)
    branch = VisionBranch(cfg).to(dtype).eval()
    feats = branch.forward_backbone(_images().to(dtype))
    out = branch.forward_enc_dec(feats, _queries(3, cfg.hidden_dim).to(dtype), torch.tensor([0, 1, 1]))
    assert out["pred_logits"].shape == (3, cfg.num_queries, 1) and out["pred_logits"].dtype == dtype
    # Boxes are refined in float32 whatever the model dtype (see transformer.py).
    assert out["pred_boxes"].shape == (3, cfg.num_queries, 4) and out["pred_boxes"].dtype == torch.float32
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert out["aux_outputs"][0]["pred_boxes"].shape == (3, cfg.num_queries, 4)
    assert out["interm_outputs"]["pred_logits"].shape == (3, cfg.num_queries, 1)
    for boxes in (out["pred_boxes"], out["interm_outputs"]["pred_boxes"]):
        assert torch.isfinite(boxes).all() and ((boxes >= 0) & (boxes <= 1)).all()
    assert torch.isfinite(out["pred_logits"]).all()


def test_padded_logits_layout(cfg):
    branch = VisionBranch(dataclasses.replace(cfg, pad_logits_to_max_text_len=True)).eval()
    out = branch(_images(1), _queries(1, cfg.hidden_dim))
    logits = out["pred_logits"]
    assert logits.shape == (1, cfg.num_queries, cfg.max_text_len)
    assert torch.isfinite(logits[..., 0]).all() and torch.isneginf(logits[..., 1:]).all()
    # upstream's text_mask in the same layout; text_token_mask keeps the unpadded one
    assert out["text_mask"].shape == (1, cfg.max_text_len) and out["text_mask"].dtype == torch.bool
    assert out["text_mask"][0, 0] and not out["text_mask"][0, 1:].any()
    assert out["text_token_mask"].shape == (1, 1)
    assert "text_mask" not in branch.__class__(cfg).eval()(_images(1), _queries(1, cfg.hidden_dim))


def test_initial_proposals_are_the_selected_cells_before_refinement(cfg):
    """interm_outputs_for_matching_pre (upstream's key): the encoder output's logits with the proposal boxes
    of the selected tokens: centred on a feature-map cell, side 0.05 * 2**level."""
    torch.manual_seed(0)
    branch = VisionBranch(cfg).eval()
    out = branch(_images(2), _queries(2, cfg.hidden_dim))
    pre, interm = out["interm_outputs_for_matching_pre"], out["interm_outputs"]
    assert pre["pred_logits"] is interm["pred_logits"]
    boxes = pre["pred_boxes"]
    # (the box head's last layer starts at zero, so a fresh model refines nothing yet; only the refined
    # boxes depend on the weights)
    assert boxes.shape == interm["pred_boxes"].shape
    assert interm["pred_boxes"].requires_grad and not boxes.requires_grad
    sides = {round(0.05 * 2 ** level, 6) for level in range(cfg.num_feature_levels)}
    assert {round(v, 6) for v in boxes[..., 2:].flatten().tolist()} <= sides


def test_gradients_reach_query_and_heads_but_not_frozen_backbone(cfg):
    torch.manual_seed(0)
    branch = VisionBranch(cfg).train()
    assert not branch.backbone.training  # frozen backbone: no stochastic depth
    queries = _queries(2, cfg.hidden_dim).requires_grad_(True)
    out = branch(_images(), queries)
    losses = GroundingCriterion(cfg)(out, [torch.tensor([[0.5, 0.5, 0.3, 0.4]]), torch.tensor([[0.2, 0.3, 0.1, 0.2]])])
    losses["loss"].backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in branch.backbone.parameters())
    assert branch.input_proj[0][0].weight.grad.abs().sum() > 0
    # The box head starts with a zero last layer, so only that layer gets a gradient at step 0.
    assert branch.bbox_embed[0].layers[-1].weight.grad.abs().sum() > 0
    assert branch.transformer.encoder.fusion_layers[0].gamma_v.grad is not None


def test_upstream_train_mode_switch(cfg):
    branch = VisionBranch(dataclasses.replace(cfg, frozen_backbone_train_mode=True)).train()
    assert branch.backbone.training


def test_each_query_is_decoded_independently_of_its_batch(branch, cfg):
    images = _images()
    queries = _queries(3, cfg.hidden_dim)
    index = torch.tensor([1, 0, 1])  # image 1 carries two queries, image 0 one
    with torch.no_grad():
        feats = branch.forward_backbone(images)
        together = branch.forward_enc_dec(feats, queries, index)
        for q in range(3):
            alone = branch.forward_enc_dec(branch.forward_backbone(images[index[q]:index[q] + 1]), queries[q:q + 1])
            torch.testing.assert_close(together["pred_boxes"][q], alone["pred_boxes"][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(together["pred_logits"][q], alone["pred_logits"][0], atol=1e-4, rtol=1e-4)
    # Two different queries on the same image give different detections.
    assert not torch.allclose(together["pred_logits"][0], together["pred_logits"][2])


def test_bad_query_arguments_are_named(branch, cfg):
    feats = branch.forward_backbone(_images())
    with pytest.raises(ValueError, match="query_image_index"):
        branch.forward_enc_dec(feats, _queries(3, cfg.hidden_dim))
    with pytest.raises(ValueError, match="out of range"):
        branch.forward_enc_dec(feats, _queries(2, cfg.hidden_dim), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="queries must be"):
        branch.forward_enc_dec(feats, _queries(2, cfg.hidden_dim + 1))
    with pytest.raises(ValueError, match="masks must be"):
        branch.forward_backbone(_images(), torch.zeros(2, 64, 64, dtype=torch.bool))


def test_padding_masks_flow_to_every_level(branch, cfg):
    images = _images()
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    mask[1, :, 64:] = True  # image 1 is 128x64 padded to 128x128
    feats = branch.forward_backbone(images, mask)
    assert [m[1, 0].float().mean().item() for m in feats.masks] == [0.5, 0.5, 0.5]
    srcs, masks, positions = branch.project_features(feats)
    assert len(srcs) == cfg.num_feature_levels and masks[3].shape == srcs[3].shape[:1] + srcs[3].shape[2:]
    assert masks[3][1, :, 1:].all() and not masks[3][0].any()
    out = branch.forward_enc_dec(feats, _queries(2, cfg.hidden_dim))
    assert torch.isfinite(out["pred_boxes"]).all()


def test_sine_position_encoding_ignores_padding():
    encoder = SinePositionEncoding(num_pos_feats=8, temperature_h=20, temperature_w=20)
    unpadded = encoder(torch.zeros(1, 4, 6, dtype=torch.bool))
    mask = torch.zeros(1, 7, 9, dtype=torch.bool)
    mask[:, 4:, :] = True
    mask[:, :, 6:] = True
    padded = encoder(mask)
    torch.testing.assert_close(padded[..., :4, :6], unpadded)
    # Last valid column: x = 2*pi (normalised), first feature is sin(2*pi / 1) = 0, second cos(2*pi) = 1.
    assert unpadded.shape == (1, 16, 4, 6)
    torch.testing.assert_close(unpadded[0, 8:10, 0, 5], torch.tensor([math.sin(2 * math.pi), 1.0]), atol=1e-5, rtol=0)


def test_select_best_boxes_threshold_rule_and_fallback():
    logits = torch.full((3, 4, 1), -5.0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(3, 4, 1)
    logits[0, 2, 0] = 2.0                            # query 0: one confident box
    boxes[0, 2] = torch.tensor([0.25, 0.5, 0.5, 0.2])
    logits[1, 1, 0] = logits[1, 3, 0] = 1.0          # query 1: a tie -> first index wins
    logits[2, :, 0] = math.log(0.3 / 0.7)            # query 2: exactly 0.3 is not above the threshold
    best = select_best_boxes(logits, boxes, [(200, 100), (10, 10), (640, 480)], box_threshold=0.3)
    assert best.found.tolist() == [True, True, False]
    assert best.query_index.tolist() == [2, 1, -1]
    torch.testing.assert_close(best.boxes_xyxy_abs[0], torch.tensor([0.0, 40.0, 100.0, 60.0]))
    assert best.scores[0].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert best.boxes_xyxy_abs[2].tolist() == [0.0, 0.0, 1.0, 1.0] and best.scores[2].item() == 0.0
    torch.testing.assert_close(best.boxes_cxcywh_norm[2],
                               torch.tensor([0.5 / 640, 0.5 / 480, 1 / 640, 1 / 480]))
    assert best.boxes_xyxy_abs_truncated[1].tolist() == [4, 3, 6, 7]


def test_predict_boxes_uses_configured_threshold(branch, cfg):
    out = branch(_images(1), _queries(1, cfg.hidden_dim))
    pred = branch.predict_boxes(out, [(640, 480)], box_threshold=1.0)
    assert not pred.found.any() and pred.boxes_xyxy_abs[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    pred = branch.predict_boxes(out, torch.tensor([[640, 480]]), box_threshold=0.0)
    assert pred.found.all()
    x1, y1, x2, y2 = pred.boxes_xyxy_abs[0].tolist()
    assert x1 < x2 and y1 < y2


def test_gradient_checkpointing_does_not_change_gradients(cfg):
    grads = []
    for use_ckpt in (False, True):
        torch.manual_seed(0)
        run_cfg = dataclasses.replace(cfg, fusion_droppath=0.0, use_transformer_ckpt=use_ckpt,
                                      fusion_use_checkpoint=use_ckpt, swin_use_checkpoint=use_ckpt)
        branch = VisionBranch(run_cfg).train()
        queries = _queries(2, cfg.hidden_dim).requires_grad_(True)
        out = branch(_images(), queries)
        GroundingCriterion(run_cfg)(out, [torch.tensor([[0.5, 0.5, 0.3, 0.4]])] * 2)["loss"].backward()
        grads.append((queries.grad, branch.transformer.encoder.layers[0].linear1.weight.grad))
    for without, with_ckpt in zip(*grads):
        torch.testing.assert_close(with_ckpt, without, atol=1e-5, rtol=1e-4)


def test_sizes_that_fit_neither_patches_nor_windows(branch, cfg):
    # 102x78 pixels -> 26x20 tokens after 4x4 patches (padded), odd sizes after the first merges.
    feats = branch.forward_backbone(_images(1, 102, 78))
    assert [tuple(f.shape[-2:]) for f in feats.feature_maps] == [(13, 10), (7, 5), (4, 3)]
    out = branch.forward_enc_dec(feats, _queries(1, cfg.hidden_dim))
    assert torch.isfinite(out["pred_boxes"]).all()
