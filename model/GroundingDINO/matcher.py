"""Hungarian matching between one query's decoder predictions and its target boxes (scipy).

Cost of assigning decoder query i to target box j (upstream GD/matcher.py):
    C = cost_bbox * |b_i - b_j|_1 + cost_class * focal_cost_i - cost_giou * GIoU(b_i, b_j)
with focal_cost = alpha (1-p)^gamma (-log(p+1e-8)) - (1-alpha) p^gamma (-log(1-p+1e-8)), p the sigmoid
probability of the query's text token(s) (averaged over the valid tokens; one token for a [VG] query).
NaN/Inf costs are replaced by 0, so the solver always has a finite problem.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from chatterbox.boxes import cxcywh_to_xyxy, pairwise_giou

__all__ = ["HungarianMatcher", "focal_match_cost"]


def focal_match_cost(prob: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal cost of calling a prediction positive, minus that of calling it negative."""
    positive = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
    negative = (1 - alpha) * prob ** gamma * (-(1 - prob + 1e-8).log())
    return positive - negative


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: torch.Tensor, boxes_cxcywh_norm: torch.Tensor, token_mask: torch.Tensor,
                    target_boxes_cxcywh_norm: torch.Tensor) -> torch.Tensor:
        """logits [Nq,T], boxes [Nq,4], token_mask [T] (True = valid), targets [k,4] -> cost [Nq,k]."""
        prob = logits.float().sigmoid()
        class_cost = (focal_match_cost(prob, self.focal_alpha, self.focal_gamma) * token_mask).sum(-1) \
            / token_mask.sum().clamp(min=1)
        pred = boxes_cxcywh_norm.float()
        target = target_boxes_cxcywh_norm.to(pred)
        cost = (self.cost_bbox * torch.cdist(pred, target, p=1)
                + self.cost_class * class_cost[:, None]
                - self.cost_giou * pairwise_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target)))
        return torch.nan_to_num(cost, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def forward(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, token_mask: torch.Tensor,
                target_boxes: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pred_logits [Q,Nq,T], pred_boxes [Q,Nq,4] cxcywh norm, token_mask [Q,T], target_boxes: Q tensors
        [k_q,4] cxcywh norm. Returns per query (decoder-query indices, target indices), int64 on CPU,
        sorted by decoder-query index."""
        if len(target_boxes) != pred_logits.shape[0]:
            raise ValueError(f"{len(target_boxes)} target sets for {pred_logits.shape[0]} queries")
        indices = []
        for q, targets in enumerate(target_boxes):
            if targets.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(pred_logits[q], pred_boxes[q], token_mask[q], targets).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
