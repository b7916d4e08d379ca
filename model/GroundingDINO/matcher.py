"""Hungarian matching between each query's decoder predictions and its target boxes (scipy).

Cost of assigning decoder query i to target box j (upstream GD/matcher.py):
    C = cost_bbox * |b_i - b_j|_1 + cost_class * focal_cost_i - cost_giou * GIoU(b_i, b_j)
with focal_cost = alpha (1-p)^gamma (-log(p+1e-8)) - (1-alpha) p^gamma (-log(1-p+1e-8)), p the sigmoid
probability of the query's text token(s) (averaged over the valid tokens; one token for a [VG] query).
NaN/Inf costs are replaced by 0, so the solver always has a finite problem.

All cost matrices of a training step (every decoder layer, the encoder output, every query) are built
on the device in one batch and either copied to the host once, where scipy solves each matrix
(``solve_with_scipy``), or solved in one batch on the device (``solve_on_device``: the host then never
waits). Upstream copies one matrix per sample per layer, which stalls the GPU each time.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from chatterbox.boxes import cxcywh_to_xyxy, elementwise_giou
from chatterbox.precision import at_least_float32

__all__ = ["HungarianMatcher", "SOLVERS", "as_index_pairs", "focal_match_cost", "pad_target_boxes", "real_target_mask"]


def focal_match_cost(prob: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal cost of calling a prediction positive, minus that of calling it negative."""
    positive = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
    negative = (1 - alpha) * prob ** gamma * (-(1 - prob + 1e-8).log())
    return positive - negative


def real_target_mask(counts: Sequence[int], max_targets: int) -> torch.Tensor:
    """[Q, max_targets] bool on the host: True where slot j < counts[q] holds a real target box."""
    return torch.arange(max_targets)[None, :] < torch.as_tensor(list(counts), dtype=torch.long).reshape(-1, 1)


def pad_target_boxes(target_boxes: Sequence[torch.Tensor], device=None, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """Q tensors [k_q,4] -> [Q, max k_q, 4] in ``dtype``; padding rows are a valid dummy box (never matched)."""
    if not target_boxes:
        return torch.zeros((0, 0, 4), device=device, dtype=dtype)
    boxes = [t.to(device=device, dtype=dtype) for t in target_boxes]
    return nn.utils.rnn.pad_sequence(boxes, batch_first=True, padding_value=0.5)


class HungarianMatcher(nn.Module):
    """Minimum-cost assignment of each query's target boxes to its decoder predictions, every layer at once.

    ``solver``: "scipy" (on the host), "device" (batched on the costs' device) or "auto" (see
    :meth:`resolve_solver`); a strategy that changes where the assignment is solved, not its result.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, solver: str = "auto"):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.solver = solver

    def cost_matrices(self, logits: torch.Tensor, boxes_cxcywh_norm: torch.Tensor, token_mask: torch.Tensor,
                      target_boxes_cxcywh_norm: torch.Tensor) -> torch.Tensor:
        """Batched costs: logits [...,Nq,T], boxes [...,Nq,4], token_mask [...,T] (True = valid), targets
        [...,K,4] (leading dimensions broadcast) -> cost [...,Nq,K] in at least float32. Logit columns beyond
        T (padding to max_text_len) are ignored."""
        dtype = at_least_float32(boxes_cxcywh_norm.dtype)
        prob = logits[..., :token_mask.shape[-1]].to(dtype).sigmoid()
        mask = token_mask[..., None, :]
        class_cost = (focal_match_cost(prob, self.focal_alpha, self.focal_gamma) * mask).sum(-1) \
            / mask.sum(-1).clamp(min=1)
        pred = boxes_cxcywh_norm.to(dtype)
        target = target_boxes_cxcywh_norm.to(pred)
        pred, target = torch.broadcast_tensors(pred[..., :, None, :], target[..., None, :, :])
        l1 = (pred - target).abs().sum(-1)
        giou = elementwise_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))
        cost = self.cost_bbox * l1 + self.cost_class * class_cost[..., None] - self.cost_giou * giou
        return torch.nan_to_num(cost, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, token_mask: torch.Tensor,
                padded_targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Every layer's matches at once.

        logits [layers,Q,Nq,T], boxes [layers,Q,Nq,4] cxcywh norm, token_mask [Q,T], padded_targets [Q,K,4]
        (pad_target_boxes), target_mask [Q,K] True = real target. Returns [layers,Q,K] long on the boxes'
        device: the decoder query matched to each target slot; the slots of one query get distinct decoder
        queries, padding slots whichever are left (callers mask them out), -1 where none is left (a query
        with more target boxes than predictions: scipy matches as many as there are).
        """
        if logits.dim() != 4 or boxes.dim() != 4 or boxes.shape[:3] != logits.shape[:3]:
            raise ValueError(f"matcher expects [layers,Q,Nq,T] logits and [layers,Q,Nq,4] boxes, got "
                             f"{tuple(logits.shape)} and {tuple(boxes.shape)}")
        costs = self.cost_matrices(logits, boxes, token_mask, padded_targets)  # [layers, Q, Nq, K]
        solve = SOLVERS[self.resolve_solver(boxes.device, target_mask.shape[1], boxes.shape[2])]
        return solve(costs, target_mask)

    def resolve_solver(self, device: torch.device, max_targets: int, num_preds: int) -> str:
        """The solver ``self.solver`` names; "auto" is "device" on a GPU for at most DEVICE_MAX_TARGETS
        boxes per query and no more than there are predictions (the host then never waits for the forward
        pass), else "scipy"."""
        if self.solver not in ("auto", *SOLVERS):
            raise ValueError(f"matcher solver must be auto, {' or '.join(SOLVERS)}, got {self.solver!r}")
        if self.solver != "auto":
            return self.solver
        on_device = device.type == "cuda" and max_targets <= min(DEVICE_MAX_TARGETS, num_preds)
        return "device" if on_device else "scipy"


def solve_with_scipy(costs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """costs [layers,Q,Nq,K], target_mask [Q,K] -> [layers,Q,K]: scipy's linear_sum_assignment on each
    query's real targets, with one device->host copy of the costs and one copy of the result back
    (``target_mask`` is best given on the host: on a device, reading it is one more copy)."""
    num_layers, num_q, num_preds, max_targets = costs.shape
    counts = target_mask.sum(dim=1).tolist()
    host = costs.cpu().numpy()
    matched = np.full((num_layers, num_q, max_targets), -1, dtype=np.int64)
    for layer in range(num_layers):
        for q, k in enumerate(counts):
            taken = np.zeros(num_preds, dtype=bool)
            if k:
                rows, cols = linear_sum_assignment(host[layer, q, :, :k])
                matched[layer, q, cols] = rows
                taken[rows] = True
            left = np.flatnonzero(~taken)[:max_targets - k]
            matched[layer, q, k:k + len(left)] = left
    return torch.from_numpy(matched).to(costs.device, non_blocking=True)


def solve_on_device(costs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """costs [layers,Q,Nq,K], target_mask [Q,K] -> [layers,Q,K] by batched_min_cost_assignment: no host
    synchronisation and fixed shapes, so it can run inside a CUDA graph."""
    num_layers, num_q, num_preds, max_targets = costs.shape
    if max_targets > num_preds:
        raise ValueError(f"{max_targets} target boxes for one query but only {num_preds} predictions: "
                         f"use the scipy solver")
    # Padding targets get a constant cost, which leaves the real targets' optimum unchanged.
    target_mask = target_mask.to(costs.device, non_blocking=True)
    costs = costs.masked_fill(~target_mask[None, :, None, :], 0.0)
    columns = batched_min_cost_assignment(costs.transpose(-1, -2).reshape(-1, max_targets, num_preds))
    return columns.view(num_layers, num_q, max_targets)


#: The assignment solvers a HungarianMatcher can use (its ``solver``; "auto" picks one per call).
SOLVERS = {"scipy": solve_with_scipy, "device": solve_on_device}

#: Most target boxes per query that "auto" solves on the device (the solver's loops grow with it).
DEVICE_MAX_TARGETS = 8


def as_index_pairs(matched: torch.Tensor, counts: Sequence[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """[layers,Q,K] matches -> per layer, per query (decoder-query indices, target indices), int64 on the
    CPU, sorted by decoder-query index (upstream's form; padding slots dropped)."""
    host = matched.cpu().numpy()
    out = []
    for layer in host:
        per_query = []
        for q, k in enumerate(counts):
            targets = np.flatnonzero(layer[q, :k] >= 0)
            order = np.argsort(layer[q, targets], kind="stable")
            per_query.append((torch.from_numpy(layer[q, targets[order]].astype(np.int64)),
                              torch.from_numpy(targets[order].astype(np.int64))))
        out.append(per_query)
    return out


def batched_min_cost_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Exact minimum-cost assignment of every row to a distinct column, for a batch of [K, N] problems
    (K <= N) at once on the cost's device, without any host synchronisation.

    cost: [B, K, N] -> [B, K] long, the column assigned to each row. The Hungarian algorithm with row
    and column potentials, adding one row at a time along a shortest augmenting path (Jonker-Volgenant
    style). Row i's search needs at most i + 1 steps; every problem runs that many, those already done
    masked, so the loops have fixed lengths and no step waits for a value from the device. Ties go to
    the lowest column index; on a unique optimum the result equals scipy's linear_sum_assignment.
    Rows whose cost is the same for every column (e.g. padding) do not change the other rows' optimum.
    """
    if cost.dim() != 3 or cost.shape[1] > cost.shape[2]:
        raise ValueError(f"cost must be [B, K, N] with K <= N, got {tuple(cost.shape)}")
    batch, rows, cols = cost.shape
    device = cost.device
    if rows == 0 or batch == 0:
        return torch.zeros((batch, rows), dtype=torch.long, device=device)
    a = torch.nan_to_num(cost.double(), nan=0.0, posinf=0.0, neginf=0.0)
    inf = a.new_full((), float("inf"))  # made on the device: no host copy (capturable)
    # Column 0 is the algorithm's virtual start column; real columns are 1..N, rows 1..K (row 0 unused).
    u = a.new_zeros(batch, rows + 1)
    v = a.new_zeros(batch, cols + 1)
    owner = torch.zeros(batch, cols + 1, dtype=torch.long, device=device)  # row holding each column, 0 = free
    arange = torch.arange(batch, device=device)
    padded = torch.cat([a.new_zeros(batch, rows, 1), a], dim=2)  # [B, K, N+1]; column 0 never read
    for row in range(1, rows + 1):
        owner[:, 0] = row
        current = torch.zeros(batch, dtype=torch.long, device=device)  # j0
        min_reduced = a.new_full((batch, cols + 1), float("inf"))
        way = torch.zeros(batch, cols + 1, dtype=torch.long, device=device)
        used = torch.zeros(batch, cols + 1, dtype=torch.bool, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        for _ in range(row):  # at most `row` steps reach a free column
            used[arange, current] |= active
            source_row = owner[arange, current]  # i0
            reduced = padded[arange, (source_row - 1).clamp(min=0)] - u[arange, source_row][:, None] - v
            improve = active[:, None] & ~used & (reduced < min_reduced)
            min_reduced = torch.where(improve, reduced, min_reduced)
            way = torch.where(improve, current[:, None], way)
            delta, nxt = torch.where(used, inf, min_reduced).min(dim=1)
            delta = torch.where(active, delta, torch.zeros_like(delta))
            # Potentials: rows of visited columns gain delta, visited columns lose it, the rest's slack shrinks.
            visited = used & active[:, None]
            u.scatter_add_(1, owner, torch.where(visited, delta[:, None], torch.zeros_like(v)))
            v = v - torch.where(visited, delta[:, None], torch.zeros_like(v))
            min_reduced = torch.where(~used & active[:, None], min_reduced - delta[:, None], min_reduced)
            current = torch.where(active, nxt, current)
            active = active & (owner[arange, current] != 0)
        # Augment along the path back to the virtual column (at most `row` links).
        walking = torch.ones(batch, dtype=torch.bool, device=device)
        for _ in range(row):
            previous = way[arange, current]
            owner[arange, current] = torch.where(walking, owner[arange, previous], owner[arange, current])
            current = torch.where(walking, previous, current)
            walking = walking & (current != 0)
    # owner[b, j] = row (1-based) of column j; invert to the column of each row.
    assigned = torch.zeros(batch, rows + 1, dtype=torch.long, device=device)
    assigned.scatter_(1, owner[:, 1:], torch.arange(1, cols + 1, device=device).expand(batch, cols))
    return assigned[:, 1:] - 1
