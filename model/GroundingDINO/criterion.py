"""Grounding loss: Hungarian matching, then sigmoid focal loss on the text logits and L1 + GIoU on the
matched boxes, for the final decoder layer, every auxiliary layer (suffix ``_k``) and the encoder's
two-stage selection (suffix ``_interm``); spec/upstream.md §1.6.

Fixes over upstream: a query may have several target boxes (upstream crashes), and the box count is
all-reduced on every call, also on a rank without grounding samples (call ``criterion(None, [], device)``
there), so no rank can hang in the collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chatterbox.boxes import cxcywh_to_xyxy, elementwise_giou

from .config import VisionBranchConfig
from .matcher import HungarianMatcher

__all__ = ["GroundingCriterion", "sigmoid_focal_loss", "global_num_boxes"]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise focal loss (RetinaNet), unreduced, in float32."""
    logits, targets = logits.float(), targets.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def global_num_boxes(local_count: int, device) -> float:
    """Target boxes per rank, averaged over ranks, at least 1. Collective whenever a process group exists."""
    count = torch.tensor([float(local_count)], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return max(count.item() / world, 1.0)


class GroundingCriterion(nn.Module):
    def __init__(self, cfg: VisionBranchConfig | None = None):
        super().__init__()
        cfg = cfg or VisionBranchConfig()
        self.matcher = HungarianMatcher(cfg.matcher_cost_class, cfg.matcher_cost_bbox, cfg.matcher_cost_giou,
                                        cfg.focal_alpha, cfg.focal_gamma)
        self.focal_alpha, self.focal_gamma = cfg.focal_alpha, cfg.focal_gamma
        self.ce_normalization = cfg.ce_normalization
        self.weight_dict = cfg.loss_weights

    def forward(self, outputs: dict | None, target_boxes: list[torch.Tensor], device=None) -> dict[str, torch.Tensor]:
        """outputs: VisionBranch.forward_enc_dec's dict for Q queries (None when this rank has none);
        target_boxes: Q tensors [k_q,4] normalised cxcywh (k_q >= 0). Returns every named term and
        ``loss`` = sum of weight * term."""
        if outputs is None:
            if target_boxes:
                raise ValueError(f"{len(target_boxes)} target sets given without outputs")
            if device is None:
                raise ValueError("pass device= when this rank has no grounding queries")
        else:
            device = outputs["pred_boxes"].device
            if len(target_boxes) != outputs["pred_boxes"].shape[0]:
                raise ValueError(f"{len(target_boxes)} target sets for {outputs['pred_boxes'].shape[0]} queries")
            for q, boxes in enumerate(target_boxes):
                if boxes.dim() != 2 or boxes.shape[-1] != 4:
                    raise ValueError(f"target_boxes[{q}] must be [k,4] normalised cxcywh, got {tuple(boxes.shape)}")
        num_boxes = global_num_boxes(sum(int(b.shape[0]) for b in target_boxes), device)
        if outputs is None:
            zero = torch.zeros((), device=device)
            losses = {name: zero for name in self.weight_dict}
            losses["loss"] = zero
            return losses

        target_boxes = [b.to(device) for b in target_boxes]
        token_mask = outputs["text_token_mask"]
        layers = [("", outputs)]
        layers += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "interm_outputs" in outputs:
            layers.append(("_interm", outputs["interm_outputs"]))
        losses = {}
        for suffix, layer in layers:
            if f"loss_ce{suffix}" not in self.weight_dict:
                continue
            indices = self.matcher(layer["pred_logits"], layer["pred_boxes"], token_mask, target_boxes)
            for name, value in self._layer_losses(layer, token_mask, target_boxes, indices, num_boxes).items():
                losses[name + suffix] = value
        losses["loss"] = sum(self.weight_dict[name] * value for name, value in losses.items())
        return losses

    def _layer_losses(self, layer, token_mask, target_boxes, indices, num_boxes) -> dict[str, torch.Tensor]:
        logits, boxes = layer["pred_logits"], layer["pred_boxes"]
        num_slots = token_mask.shape[1]
        logits = logits[..., :num_slots]  # drop -inf padding columns if the logits were padded
        query_idx = torch.cat([torch.full_like(src, q) for q, (src, _) in enumerate(indices)]).to(logits.device)
        pred_idx = torch.cat([src for src, _ in indices]).to(logits.device)

        # Classification: matched decoder queries are positive on every valid text token.
        targets = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        targets[query_idx, pred_idx] = 1.0
        valid = token_mask[:, None, :].expand_as(logits)
        focal = sigmoid_focal_loss(logits[valid], targets[valid], self.focal_alpha, self.focal_gamma).sum()
        ce_norm = num_boxes if self.ce_normalization == "num_boxes" else max(float(pred_idx.numel()), 1.0)

        matched_pred = boxes[query_idx, pred_idx].float()
        matched_target = torch.cat([t[tgt] for t, (_, tgt) in zip(target_boxes, indices)]).float()
        l1 = F.l1_loss(matched_pred, matched_target, reduction="none").sum()
        giou = (1 - elementwise_giou(cxcywh_to_xyxy(matched_pred), cxcywh_to_xyxy(matched_target))).sum()
        return {"loss_ce": focal / ce_norm, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}
