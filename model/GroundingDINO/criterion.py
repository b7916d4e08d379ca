"""Grounding loss: Hungarian matching, then sigmoid focal loss on the text logits and L1 + GIoU on the
matched boxes, for the final decoder layer, every auxiliary layer (suffix ``_k``) and the encoder's
two-stage selection (suffix ``_interm``); spec/upstream.md §1.6.

Fixes over upstream: a query may have several target boxes (upstream crashes), and the box count is
all-reduced on every call, also on a rank without grounding samples (call ``criterion(None, [], device)``
there), so no rank can hang in the collective.

Speed: all layers are matched at once, on the GPU (HungarianMatcher.match_padded: no round trip, fixed
shapes, see ``padded_terms``) or with one device->host copy and scipy (match_layers, whose indices go back
in one host->device copy), and every loss term is computed for all layers at once on stacked tensors, so
the criterion costs a few dozen kernels whatever the layer and query counts (upstream: one round trip per
sample per layer plus one per boolean-mask selection).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chatterbox.boxes import cxcywh_to_xyxy, elementwise_giou
from chatterbox.precision import at_least_float32

from .config import VisionBranchConfig
from .matcher import HungarianMatcher, pad_target_boxes, real_target_mask

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


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without stalling the host (an asynchronous copy; CUDA stages
    pageable memory at once, so the array may be freed right after)."""
    return torch.from_numpy(array).to(device, non_blocking=True)


def _host_pairs(indices: list[list[tuple[np.ndarray, np.ndarray]]], device) -> tuple[tuple, list[int]]:
    """Host matches (per layer, per query: decoder queries, targets) -> the (layer, query, decoder query,
    target) index tensors of every pair on ``device`` in one host->device copy, and the pairs per layer."""
    pairs_per_layer = [sum(len(src) for src, _ in layer_indices) for layer_indices in indices]
    quads = np.zeros((4, sum(pairs_per_layer)), dtype=np.int64)
    col = 0
    for layer_id, layer_indices in enumerate(indices):
        for q, (src, tgt) in enumerate(layer_indices):
            n = len(src)
            quads[0, col:col + n] = layer_id
            quads[1, col:col + n] = q
            quads[2, col:col + n] = src
            quads[3, col:col + n] = tgt
            col += n
    return tuple(_to_device(quads, device).unbind(0)), pairs_per_layer


def _device_matches_as_indices(matched: torch.Tensor, counts: list[int]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """[layers,Q,K] decoder query per target slot -> per layer, per query (decoder queries, targets) sorted
    by decoder query, as the host matcher gives them (padding slots dropped)."""
    host = matched.cpu().numpy()
    out = []
    for layer in host:
        per_query = []
        for q, k in enumerate(counts):
            order = np.argsort(layer[q, :k], kind="stable")
            per_query.append((layer[q, :k][order].astype(np.int64), order.astype(np.int64)))
        out.append(per_query)
    return out


class GroundingCriterion(nn.Module):
    # Per output layer. loss_xy / loss_hw are the L1 of the centres / sizes, detached and without a weight:
    # logged, as upstream logs them, never trained on.
    TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw")
    LOGGED_ONLY = ("loss_xy", "loss_hw")

    def __init__(self, cfg: VisionBranchConfig | None = None):
        super().__init__()
        cfg = cfg or VisionBranchConfig()
        self.matcher = HungarianMatcher(cfg.matcher_cost_class, cfg.matcher_cost_bbox, cfg.matcher_cost_giou,
                                        cfg.focal_alpha, cfg.focal_gamma)
        self.focal_alpha, self.focal_gamma = cfg.focal_alpha, cfg.focal_gamma
        self.ce_normalization = cfg.ce_normalization
        self.weight_dict = cfg.loss_weights
        self._weight_cache: dict = {}
        # "auto": solve the assignments on the GPU (no host round trip) when every query has at most
        # DEVICE_MATCH_MAX_TARGETS boxes, else with scipy on the host; "device" / "host" force one.
        self.matching = "auto"

    DEVICE_MATCH_MAX_TARGETS = 8

    def _matches_on_device(self, predictions, counts: list[int]) -> bool:
        if self.matching not in ("auto", "device", "host"):
            raise ValueError(f"GroundingCriterion.matching must be auto, device or host, got {self.matching!r}")
        same_shapes = all(lg.shape == predictions[0][0].shape and bx.shape == predictions[0][1].shape
                          for lg, bx in predictions)
        if self.matching == "host" or not same_shapes:
            return False
        return self.matching == "device" or (predictions[0][1].is_cuda and max(counts) <= self.DEVICE_MATCH_MAX_TARGETS)

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
        predictions = [(layer["pred_logits"], layer["pred_boxes"]) for _, layer in layers]
        counts = [int(b.shape[0]) for b in target_boxes]
        if self._matches_on_device(predictions, counts):
            target_mask = real_target_mask(counts, padded_targets.shape[1]).to(device, non_blocking=True)
            query_mask = torch.ones(len(counts), dtype=torch.bool, device=device)
            terms, matched = self.padded_terms([layer for _, layer in layers], token_mask, padded_targets,
                                               target_mask, query_mask, num_boxes)
            indices = _device_matches_as_indices(matched, counts) if return_indices else None
        else:
            indices = self.matcher.match_layers_host(predictions, token_mask, target_boxes, padded_targets)
            terms = self._all_layer_losses([layer for _, layer in layers], token_mask, padded_targets, indices,
                                           num_boxes)
        losses = self.named_losses(terms, [suffix for suffix, _ in layers], device)
        if not return_indices:
            return losses
        by_suffix = {suffix: [(torch.as_tensor(rows), torch.as_tensor(cols)) for rows, cols in layer_indices]
                     for (suffix, _), layer_indices in zip(layers, indices)}
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
                     target_mask: torch.Tensor, query_mask: torch.Tensor, num_boxes
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each term for every layer at once -> ({term: [layers]} (at least float32), the matches [layers,Q,K]:
        the decoder query of each target slot), matched on the device with fixed
        shapes: no host synchronisation and no shape that depends on the data, so the whole computation can
        be captured in a CUDA graph. ``padded_targets`` [Q,K,4] with ``target_mask`` [Q,K] marking the real
        boxes; ``query_mask`` [Q] the real queries (a padding query adds nothing); ``num_boxes`` a float or
        a 0-d tensor."""
        num_slots = token_mask.shape[1]
        # [layers, Q, Nq, T]; drop the -inf padding columns if the logits were padded
        logits = torch.stack([layer["pred_logits"][..., :num_slots] for layer in layers])
        boxes = torch.stack([layer["pred_boxes"] for layer in layers])
        matched = self.matcher.match_padded(logits, boxes, token_mask, padded_targets, target_mask)  # [layers,Q,K]
        dtype = padded_targets.dtype
        real = target_mask.to(dtype).expand(len(layers), -1, -1).contiguous()

        # Classification: each matched decoder query is positive on every valid text token. The decoder
        # queries a layer matches to one query's targets are distinct, so padding slots (value 0) never
        # overwrite a real match.
        positives = torch.zeros(logits.shape[:3], dtype=dtype, device=logits.device)
        positives.scatter_(2, matched, real)
        valid = token_mask[None, :, None, :] & query_mask[None, :, None, None]
        focal = sigmoid_focal_loss(logits.masked_fill(~valid, 0.0), positives[..., None].expand_as(logits),
                                   self.focal_alpha, self.focal_gamma)
        focal = (focal * valid).sum(dim=(1, 2, 3))
        if self.ce_normalization == "num_boxes":
            loss_ce = focal / num_boxes
        else:  # upstream: this rank's matched pairs, the same count in every layer
            loss_ce = focal / real[0].sum().clamp(min=1.0)

        picked = boxes.gather(2, matched[..., None].expand(-1, -1, -1, 4)).to(dtype)  # [layers, Q, K, 4]
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

    def _all_layer_losses(self, layers, token_mask, padded_targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """{term: [layers]}; layers of equal shapes (normally all of them) are computed as one stack."""
        groups: dict[tuple, list[int]] = {}
        for i, layer in enumerate(layers):
            groups.setdefault((tuple(layer["pred_logits"].shape), tuple(layer["pred_boxes"].shape)), []).append(i)
        if len(groups) == 1:
            return self._stacked_losses(layers, token_mask, padded_targets, *_host_pairs(indices, token_mask.device),
                                        num_boxes)
        per_layer: list[dict] = [{} for _ in layers]
        for positions in groups.values():
            part = self._stacked_losses([layers[i] for i in positions], token_mask, padded_targets,
                                        *_host_pairs([indices[i] for i in positions], token_mask.device), num_boxes)
            for j, i in enumerate(positions):
                per_layer[i] = {name: part[name][j] for name in self.TERMS}
        return {name: torch.stack([terms[name] for terms in per_layer]) for name in self.TERMS}

    def _stacked_losses(self, layers: list[dict], token_mask: torch.Tensor, padded_targets: torch.Tensor,
                        pairs: tuple[torch.Tensor, ...], pairs_per_layer: list[int],
                        num_boxes: float) -> dict[str, torch.Tensor]:
        """Each term for every layer at once -> {term: [layers]} (at least float32). ``pairs``: the (layer, query,
        decoder query, target) index of every matched pair, grouped by layer (``pairs_per_layer``)."""
        num_slots = token_mask.shape[1]
        # [layers, Q, Nq, T]; drop the -inf padding columns if the logits were padded
        logits = torch.stack([layer["pred_logits"][..., :num_slots] for layer in layers])
        boxes = torch.stack([layer["pred_boxes"] for layer in layers])
        device = logits.device
        num_layers = len(layers)
        layer_idx, query_idx, pred_idx, tgt_idx = pairs

        # Classification: matched decoder queries are positive on every valid text token; the padded
        # (-inf) text slots are excluded (their logits zeroed first so that no inf/NaN reaches autograd).
        targets = torch.zeros(logits.shape[:3], dtype=padded_targets.dtype, device=device)
        # (a device-side one: assigning the Python float 1.0 would copy it host->device and synchronise)
        targets.index_put_((layer_idx, query_idx, pred_idx), targets.new_ones(()))
        valid = token_mask[None, :, None, :]
        focal = sigmoid_focal_loss(logits.masked_fill(~valid, 0.0), targets[..., None].expand_as(logits),
                                   self.focal_alpha, self.focal_gamma)
        focal = (focal * valid).sum(dim=(1, 2, 3))
        if self.ce_normalization == "num_boxes":
            loss_ce = focal / num_boxes
        elif len(set(pairs_per_layer)) == 1:  # upstream: this rank's matched pairs
            loss_ce = focal / max(float(pairs_per_layer[0]), 1.0)
        else:
            loss_ce = focal / torch.tensor([max(float(p), 1.0) for p in pairs_per_layer], device=device)

        matched_pred = boxes[layer_idx, query_idx, pred_idx].to(padded_targets.dtype)
        matched_target = padded_targets[query_idx, tgt_idx]
        l1 = (matched_pred - matched_target).abs()  # [pairs, 4]
        giou = 1 - elementwise_giou(cxcywh_to_xyxy(matched_pred), cxcywh_to_xyxy(matched_target))
        if len(set(pairs_per_layer)) == 1:  # always with equal query counts: one row per layer
            per_layer = l1.view(num_layers, -1, 4)
            giou = giou.view(num_layers, -1).sum(-1)
        else:  # zero-padded to the longest layer
            per_layer = nn.utils.rnn.pad_sequence(list(l1.split(pairs_per_layer)), batch_first=True)
            giou = torch.stack([part.sum() for part in giou.split(pairs_per_layer)])
        return {"loss_ce": loss_ce, "loss_bbox": per_layer.sum(dim=(1, 2)) / num_boxes, "loss_giou": giou / num_boxes,
                **self._centre_and_size_terms(per_layer.detach(), num_boxes)}
