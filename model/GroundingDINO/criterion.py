"""Grounding loss: Hungarian matching, then sigmoid focal loss on the text logits and L1 + GIoU on the
matched boxes, for the final decoder layer, every auxiliary layer (suffix ``_k``) and the encoder's
two-stage selection (suffix ``_interm``); spec/upstream.md §1.6.

Fixes over upstream: a query may have several target boxes (upstream crashes), and the box count is
all-reduced on every call, also on a rank without grounding samples (call ``criterion(None, [], device)``
there), so no rank can hang in the collective.

One implementation for every case: all layers are matched at once (the matcher's solver: scipy on the
host, or on the device without a round trip) and every term is computed for all layers at once on
fixed-shape, masked tensors (``padded_terms``), so the criterion costs a few dozen kernels whatever the
layer and query counts (upstream: one round trip per sample per layer plus one per boolean-mask
selection), and the same computation can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chatterbox.boxes import cxcywh_to_xyxy, elementwise_giou
from chatterbox.precision import at_least_float32

from .config import VisionBranchConfig
from .matcher import HungarianMatcher, as_index_pairs, pad_target_boxes, real_target_mask

__all__ = ["GroundingCriterion", "sigmoid_focal_loss", "global_num_boxes"]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise focal loss (RetinaNet), unreduced, in at least float32."""
    dtype = at_least_float32(logits.dtype)
    logits, targets = logits.to(dtype), targets.to(dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def global_num_boxes(local_count: int, device) -> float:
    """Target boxes per rank, averaged over ranks, at least 1. Collective whenever a process group exists
    (no device round trip without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return max(float(local_count), 1.0)
    count = torch.tensor([float(local_count)], device=device)
    dist.all_reduce(count)
    return max(count.item() / dist.get_world_size(), 1.0)


class GroundingCriterion(nn.Module):
    # Per output layer. loss_xy / loss_hw are the L1 of the centres / sizes, detached and without a weight:
    # logged, as upstream logs them, never trained on.
    TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw")
    LOGGED_ONLY = ("loss_xy", "loss_hw")

    def __init__(self, cfg: VisionBranchConfig | None = None, solver: str = "auto"):
        """``solver``: where the matcher solves its assignments (HungarianMatcher: "auto", "scipy", "device")."""
        super().__init__()
        cfg = cfg or VisionBranchConfig()
        self.matcher = HungarianMatcher(cfg.matcher_cost_class, cfg.matcher_cost_bbox, cfg.matcher_cost_giou,
                                        cfg.focal_alpha, cfg.focal_gamma, solver=solver)
        self.focal_alpha, self.focal_gamma = cfg.focal_alpha, cfg.focal_gamma
        self.ce_normalization = cfg.ce_normalization
        self.weight_dict = cfg.loss_weights
        self._weight_cache: dict = {}

    def forward(self, outputs: dict | None, target_boxes: list[torch.Tensor], device=None,
                return_indices: bool = False):
        """outputs: VisionBranch.forward_enc_dec's dict for Q queries (None when this rank has none);
        target_boxes: Q tensors [k_q,4] normalised cxcywh (k_q >= 0). Returns every named term and
        ``loss`` = sum of weight * term.

        ``return_indices``: also return the Hungarian matches, as upstream's criterion does: a list over the
        matched layers in upstream's order (decoder layers 0..L-2, the encoder output, then the last decoder
        layer), each a list over queries of (decoder-query indices, target indices), int64 on the CPU,
        sorted by decoder-query index."""
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
            suffixes = [name[len("loss_ce"):] for name in self.weight_dict if name.startswith("loss_ce")]
            losses = {name + suffix: zero for suffix in suffixes for name in self.TERMS}
            losses["loss"] = zero
            return (losses, []) if return_indices else losses

        token_mask = outputs["text_token_mask"]
        layers = self.loss_layers(outputs)
        if not layers:
            zero = outputs["pred_boxes"].sum() * 0.0
            return ({"loss": zero}, []) if return_indices else {"loss": zero}
        padded_targets = pad_target_boxes(target_boxes, device, at_least_float32(outputs["pred_boxes"].dtype))
        counts = [int(b.shape[0]) for b in target_boxes]
        target_mask = real_target_mask(counts, padded_targets.shape[1])  # on the host: scipy reads it there
        query_mask = torch.ones(len(counts), dtype=torch.bool, device=device)
        terms, matched = self.padded_terms([layer for _, layer in layers], token_mask, padded_targets, target_mask,
                                           query_mask, num_boxes)
        losses = self.named_losses(terms, [suffix for suffix, _ in layers], device)
        if not return_indices:
            return losses
        by_suffix = dict(zip([suffix for suffix, _ in layers], as_index_pairs(matched, counts)))
        upstream_order = [s for s in by_suffix if s.startswith("_") and s != "_interm"] + \
            [s for s in ("_interm", "") if s in by_suffix]
        return losses, [by_suffix[s] for s in upstream_order]

    def loss_layers(self, outputs: dict) -> list[tuple[str, dict]]:
        """(suffix, predictions) of every output layer that has a loss weight: final, auxiliary, encoder."""
        layers = [("", outputs)]
        layers += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "interm_outputs" in outputs:
            layers.append(("_interm", outputs["interm_outputs"]))
        return [(suffix, layer) for suffix, layer in layers if f"loss_ce{suffix}" in self.weight_dict]

    def named_losses(self, terms: dict[str, torch.Tensor], suffixes: list[str], device) -> dict[str, torch.Tensor]:
        """{term: [layers]} -> every named term (``loss_ce_0``, ...) and ``loss`` = their weighted sum."""
        stacked = torch.stack([terms[name] for name in self.TERMS])
        return {**self.name_terms(stacked, suffixes), "loss": self.weighted_sum(stacked, suffixes, device)}

    def name_terms(self, stacked: torch.Tensor, suffixes: list[str]) -> dict[str, torch.Tensor]:
        """[terms, layers] (TERMS per layer) -> {``loss_ce_0``: value, ...}."""
        return {name + suffix: stacked[t, i].detach() if name in self.LOGGED_ONLY else stacked[t, i]
                for i, suffix in enumerate(suffixes) for t, name in enumerate(self.TERMS)}

    def weighted_sum(self, stacked: torch.Tensor, suffixes: list[str], device) -> torch.Tensor:
        """The grounding loss: sum of weight * term over the [terms, layers] stack."""
        return (self._weights(suffixes, device, stacked.dtype) * stacked).sum()

    def _weights(self, suffixes: list[str], device, dtype: torch.dtype) -> torch.Tensor:
        """[terms, layers] weights of TERMS per layer (0 where weight_dict has none), made once per
        device/layout/dtype."""
        key = (tuple(suffixes), str(device), dtype)
        if key not in self._weight_cache:
            table = [[self.weight_dict.get(name + suffix, 0.0) for suffix in suffixes] for name in self.TERMS]
            self._weight_cache[key] = torch.tensor(table, dtype=dtype, device=device)
        return self._weight_cache[key]

    def padded_terms(self, layers: list[dict], token_mask: torch.Tensor, padded_targets: torch.Tensor,
                     target_mask: torch.Tensor, query_mask: torch.Tensor, num_boxes, local_pairs=None
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each term for every layer at once -> ({term: [layers]} (at least float32), the matches [layers,Q,K]:
        the decoder query of each target slot, -1 where none). Fixed shapes: with the device solver there is no host
        synchronisation and no shape that depends on the data, so the computation can be captured in a
        CUDA graph. ``padded_targets`` [Q,K,4] with ``target_mask`` [Q,K] marking the real
        boxes; ``query_mask`` [Q] the real queries (a padding query adds nothing); ``num_boxes`` a float or
        a 0-d tensor; ``local_pairs``: this rank's matched pairs, for ``ce_normalization: local_matches`` when the
        call sees only some of its queries (None: counted here)."""
        num_slots = token_mask.shape[1]
        shapes = {(tuple(layer["pred_logits"].shape), tuple(layer["pred_boxes"].shape)) for layer in layers}
        if len(shapes) != 1:
            raise ValueError(f"every output layer must have the same prediction shapes, got {sorted(shapes)}")
        # [layers, Q, Nq, T]; drop the -inf padding columns if the logits were padded
        logits = torch.stack([layer["pred_logits"][..., :num_slots] for layer in layers])
        boxes = torch.stack([layer["pred_boxes"] for layer in layers])
        matched = self.matcher(logits, boxes, token_mask, padded_targets, target_mask)  # [layers, Q, K]
        dtype = padded_targets.dtype
        # A real target slot is left unmatched (-1) only when a query has more boxes than predictions.
        real = (target_mask.to(logits.device, non_blocking=True)[None] & (matched >= 0)).to(dtype)
        index = matched.clamp(min=0)

        # Classification: each matched decoder query is positive on every valid text token (a sum: every
        # decoder query is matched at most once, and the padding slots add 0).
        positives = torch.zeros(logits.shape[:3], dtype=dtype, device=logits.device)
        positives.scatter_add_(2, index, real)
        valid = token_mask[None, :, None, :] & query_mask[None, :, None, None]
        focal = sigmoid_focal_loss(logits.masked_fill(~valid, 0.0), positives[..., None].expand_as(logits),
                                   self.focal_alpha, self.focal_gamma)
        focal = (focal * valid).sum(dim=(1, 2, 3))
        if self.ce_normalization == "num_boxes":
            loss_ce = focal / num_boxes
        else:  # upstream: this rank's matched pairs
            pairs = real.sum(dim=(1, 2)) if local_pairs is None else torch.as_tensor(local_pairs, dtype=dtype)
            loss_ce = focal / pairs.clamp(min=1.0)

        picked = boxes.gather(2, index[..., None].expand(-1, -1, -1, 4)).to(dtype)  # [layers, Q, K, 4]
        target = padded_targets[None].expand_as(picked)
        l1 = (picked - target).abs() * real[..., None]  # [layers, Q, K, 4]
        giou = ((1 - elementwise_giou(cxcywh_to_xyxy(picked), cxcywh_to_xyxy(target))) * real).sum(dim=(1, 2))
        terms = {"loss_ce": loss_ce, "loss_bbox": l1.sum(dim=(1, 2, 3)) / num_boxes, "loss_giou": giou / num_boxes,
                 **self._centre_and_size_terms(l1.detach().flatten(1, 2), num_boxes)}
        return terms, matched

    @staticmethod
    def _centre_and_size_terms(l1: torch.Tensor, num_boxes) -> dict[str, torch.Tensor]:
        """[layers, pairs, 4] element-wise L1 of matched boxes -> loss_xy and loss_hw per layer."""
        return {"loss_xy": l1[..., :2].sum(dim=(1, 2)) / num_boxes, "loss_hw": l1[..., 2:].sum(dim=(1, 2)) / num_boxes}
