"""The batched matcher/criterion (all layers and queries at once, one host round trip or none) against a
straightforward per-query, per-layer reference: identical assignments, the same losses and gradients."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from chatterbox.boxes import cxcywh_to_xyxy, elementwise_giou, pairwise_giou
from model.GroundingDINO import GroundingCriterion, HungarianMatcher, VisionBranchConfig
from model.GroundingDINO.criterion import sigmoid_focal_loss
from model.GroundingDINO.matcher import (as_index_pairs, batched_min_cost_assignment, focal_match_cost,
                                         pad_target_boxes, real_target_mask)

ALPHA, GAMMA = 0.25, 2.0


def match_layers(matcher, layers, token_mask, target_boxes, solver="scipy"):
    """(logits [Q,Nq,T], boxes [Q,Nq,4]) per layer -> per layer, per query (decoder queries, targets)."""
    matcher.solver = solver
    padded = pad_target_boxes(target_boxes)
    counts = [len(t) for t in target_boxes]
    matched = matcher(torch.stack([lg for lg, _ in layers]), torch.stack([bx for _, bx in layers]), token_mask,
                      padded, real_target_mask(counts, padded.shape[1]))
    return as_index_pairs(matched, counts)


def match_layer(logits, boxes, token_mask, target_boxes, solver="scipy"):
    """One layer's matches: per query (decoder-query indices, target indices)."""
    return match_layers(HungarianMatcher(), [(logits, boxes)], token_mask, target_boxes, solver)[0]


# ---------------------------------------------------------------------------------------------------
# reference: one cost matrix, one host copy and one solver call per query per layer (upstream's shape)
def reference_match(logits, boxes, token_mask, target_boxes, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0):
    indices = []
    for q, targets in enumerate(target_boxes):
        if targets.numel() == 0:
            indices.append(([], []))
            continue
        prob = logits[q].float().sigmoid()
        mask = token_mask[q]
        class_cost = (focal_match_cost(prob, ALPHA, GAMMA) * mask).sum(-1) / mask.sum().clamp(min=1)
        pred = boxes[q].float()
        cost = (cost_bbox * torch.cdist(pred, targets, p=1) + cost_class * class_cost[:, None]
                - cost_giou * pairwise_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(targets)))
        cost = torch.nan_to_num(cost, nan=0.0, posinf=0.0, neginf=0.0)
        rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
        indices.append((rows.tolist(), cols.tolist()))
    return indices


def reference_losses(outputs, target_boxes, weights, ce_normalization="num_boxes"):
    token_mask = outputs["text_token_mask"]
    num_boxes = max(float(sum(len(t) for t in target_boxes)), 1.0)
    layers = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])]
    layers.append(("_interm", outputs["interm_outputs"]))
    losses, matches = {}, {}
    for suffix, layer in layers:
        logits = layer["pred_logits"][..., :token_mask.shape[1]]
        indices = reference_match(logits, layer["pred_boxes"], token_mask, target_boxes)
        matches[suffix] = indices
        query_idx = torch.tensor([q for q, (src, _) in enumerate(indices) for _ in src], dtype=torch.long)
        pred_idx = torch.tensor([i for src, _ in indices for i in src], dtype=torch.long)
        targets = torch.zeros(logits.shape)
        targets[query_idx, pred_idx] = 1.0
        valid = token_mask[:, None, :].expand_as(logits)
        focal = sigmoid_focal_loss(logits[valid], targets[valid], ALPHA, GAMMA).sum()
        ce_norm = num_boxes if ce_normalization == "num_boxes" else max(float(pred_idx.numel()), 1.0)
        pred = layer["pred_boxes"][query_idx, pred_idx].float()
        target = torch.cat([t[list(tgt)] for t, (_, tgt) in zip(target_boxes, indices)]).float()
        losses["loss_ce" + suffix] = focal / ce_norm
        l1 = F.l1_loss(pred, target, reduction="none")
        losses["loss_bbox" + suffix] = l1.sum() / num_boxes
        losses["loss_giou" + suffix] = (1 - elementwise_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))).sum() \
            / num_boxes
        losses["loss_xy" + suffix] = l1[..., :2].sum().detach() / num_boxes  # logged only, as upstream
        losses["loss_hw" + suffix] = l1[..., 2:].sum().detach() / num_boxes
    losses["loss"] = sum(weights.get(name, 0.0) * value for name, value in losses.items())
    return losses, matches


# ---------------------------------------------------------------------------------------------------
def random_outputs(seed: int, num_q=5, nq=40, slots=3, padded_to=0, layers=6, interm_nq=None):
    """forward_enc_dec-shaped outputs with leaf tensors per layer; query q has 1 + q % slots valid tokens
    and -inf logits in its invalid slots (and in the padding columns up to ``padded_to``)."""
    g = torch.Generator().manual_seed(seed)
    token_mask = torch.arange(slots)[None, :] <= (torch.arange(num_q) % slots)[:, None]
    width = max(slots, padded_to)

    def layer(n):
        logits = 2 * torch.randn(num_q, n, width, generator=g)
        logits[..., :slots] = logits[..., :slots].masked_fill(~token_mask[:, None, :], float("-inf"))
        logits[..., slots:] = float("-inf")
        centre = 0.15 + 0.7 * torch.rand(num_q, n, 2, generator=g)
        size = 0.05 + 0.4 * torch.rand(num_q, n, 2, generator=g)
        boxes = torch.cat([centre, size], -1)
        return {"pred_logits": logits.requires_grad_(True), "pred_boxes": boxes.requires_grad_(True)}

    all_layers = [layer(nq) for _ in range(layers)]
    return {**all_layers[-1], "text_token_mask": token_mask, "aux_outputs": all_layers[:-1],
            "interm_outputs": layer(interm_nq or nq)}


def random_targets(seed: int, counts):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([0.2 + 0.6 * torch.rand(k, 2, generator=g), 0.05 + 0.3 * torch.rand(k, 2, generator=g)], -1)
            for k in counts]


def leaves(outputs):
    layers = [outputs] + outputs["aux_outputs"] + [outputs["interm_outputs"]]
    return [t for layer in layers for t in (layer["pred_logits"], layer["pred_boxes"])]


def clone_outputs(outputs):
    def copy(layer):
        return {k: layer[k].detach().clone().requires_grad_(True) for k in ("pred_logits", "pred_boxes")}
    return {**copy(outputs), "text_token_mask": outputs["text_token_mask"],
            "aux_outputs": [copy(a) for a in outputs["aux_outputs"]], "interm_outputs": copy(outputs["interm_outputs"])}


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_batched_matching_equals_per_query_matching_on_every_layer(seed):
    outputs = random_outputs(seed)
    targets = random_targets(100 + seed, [1, 3, 0, 2, 4])
    layers = [outputs] + outputs["aux_outputs"] + [outputs["interm_outputs"]]
    matched = match_layers(HungarianMatcher(), [(lay["pred_logits"], lay["pred_boxes"]) for lay in layers],
                           outputs["text_token_mask"], targets)
    assert len(matched) == 7
    for layer, got in zip(layers, matched):
        want = reference_match(layer["pred_logits"], layer["pred_boxes"], outputs["text_token_mask"], targets)
        assert [(r.tolist(), c.tolist()) for r, c in got] == want
        for (rows, cols), boxes in zip(got, targets):
            assert rows.dtype == torch.int64 and len(rows) == len(boxes) and rows.tolist() == sorted(rows.tolist())


@pytest.mark.parametrize("ce_normalization", ["num_boxes", "local_matches"])
@pytest.mark.parametrize("seed", range(3))
def test_batched_criterion_equals_the_per_layer_reference(seed, ce_normalization):
    cfg = dataclasses.replace(VisionBranchConfig(), ce_normalization=ce_normalization)
    ours = random_outputs(seed, padded_to=6 if seed == 1 else 0)
    theirs = clone_outputs(ours)
    targets = random_targets(200 + seed, [2, 1, 3, 0, 1])
    got = GroundingCriterion(cfg)(ours, targets)
    want, _ = reference_losses(theirs, targets, cfg.loss_weights, ce_normalization)
    assert list(got) == list(want)  # same terms, same order
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-6, atol=1e-7, msg=name)
    got["loss"].backward()
    want["loss"].backward()
    for mine, ref in zip(leaves(ours), leaves(theirs)):
        assert torch.isfinite(mine.grad).all()
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_one_host_copy_each_way_with_scipy_and_layers_of_other_shapes_refused(monkeypatch):
    """The scipy solver reads every layer's costs in one device->host copy; output layers whose shapes
    differ (never the case in GroundingDINO, whose encoder selects as many queries as the decoder has)
    are refused."""
    outputs = random_outputs(7, nq=12)
    theirs = clone_outputs(outputs)
    targets = random_targets(8, [2, 1, 0, 3, 1])
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or real_cpu(self, *a, **k))
    got = GroundingCriterion(solver="scipy")(outputs, targets)
    monkeypatch.undo()
    assert copies == [(7, 5, 12, 3)]  # every layer's costs at once
    want, _ = reference_losses(theirs, targets, VisionBranchConfig().loss_weights)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="same prediction shapes"):
        GroundingCriterion()(random_outputs(7, nq=12, interm_nq=20), targets)


def test_half_precision_logits_match_like_their_float32_values():
    outputs = random_outputs(3)
    targets = random_targets(4, [1, 2, 2, 1, 3])
    layer = outputs["aux_outputs"][2]
    logits, boxes = layer["pred_logits"].detach().bfloat16(), layer["pred_boxes"].detach().bfloat16()
    got = match_layer(logits, boxes, outputs["text_token_mask"], targets)
    want = reference_match(logits.float(), boxes.float(), outputs["text_token_mask"], targets)
    assert [(r.tolist(), c.tolist()) for r, c in got] == want


# ---------------------------------------------------------------------------------------------------
# the device solver (plain tensor code: tested here on the CPU, run on the GPU in training)
@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 9), (2, 5), (3, 900), (5, 7), (7, 7), (8, 30), (12, 40)])
def test_device_solver_equals_scipy_on_random_problems(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    cost = torch.randn(25, rows, cols, generator=g) * torch.rand(25, 1, 1, generator=g) * 10
    assigned = batched_min_cost_assignment(cost)
    assert assigned.shape == (25, rows) and assigned.dtype == torch.long
    for b in range(25):
        want_rows, want_cols = linear_sum_assignment(cost[b].numpy())
        assert assigned[b].tolist() == want_cols.tolist(), b


def test_device_solver_on_ties_non_finite_costs_and_constant_padding_rows():
    g = torch.Generator().manual_seed(5)
    # Integer costs: many optimal assignments; the total cost must still be the optimum.
    ties = torch.randint(0, 3, (40, 4, 6), generator=g).float()
    for b, cols in enumerate(batched_min_cost_assignment(ties)):
        assert len(set(cols.tolist())) == 4
        best = ties[b][linear_sum_assignment(ties[b].numpy())].sum()
        assert ties[b][torch.arange(4), cols].sum() == best
    # NaN/inf count as 0, as in the host matcher.
    cost = torch.randn(3, 3, 8, generator=g)
    cost[0, 1, 2], cost[1, 0, :3], cost[2, 2, 5] = float("nan"), float("inf"), float("-inf")
    cleaned = torch.nan_to_num(cost, nan=0.0, posinf=0.0, neginf=0.0)
    for b, cols in enumerate(batched_min_cost_assignment(cost)):
        assert cols.tolist() == linear_sum_assignment(cleaned[b].numpy())[1].tolist()
    # A constant row (a padding target) leaves the other rows' assignment as without it.
    real = torch.randn(10, 2, 9, generator=g)
    padded = torch.cat([real, torch.zeros(10, 1, 9)], dim=1)
    assert torch.equal(batched_min_cost_assignment(padded)[:, :2], batched_min_cost_assignment(real))
    with pytest.raises(ValueError, match="K <= N"):
        batched_min_cost_assignment(torch.zeros(1, 4, 3))


@pytest.mark.parametrize("seed", range(3))
def test_device_matching_finds_the_host_matches_of_every_layer(seed):
    outputs = random_outputs(seed)
    counts = [1, 3, 0, 2, 4]
    targets = random_targets(300 + seed, counts)
    layers = [outputs] + outputs["aux_outputs"] + [outputs["interm_outputs"]]
    predictions = [(lay["pred_logits"], lay["pred_boxes"]) for lay in layers]
    host = match_layers(HungarianMatcher(), predictions, outputs["text_token_mask"], targets)
    padded = pad_target_boxes(targets)
    logits, boxes = torch.stack([lg for lg, _ in predictions]), torch.stack([bx for _, bx in predictions])
    device = HungarianMatcher(solver="device")(logits, boxes, outputs["text_token_mask"], padded,
                                               real_target_mask(counts, padded.shape[1]))
    assert device.shape == (7, len(counts), max(counts))
    for layer, (on_device, on_host) in enumerate(zip(device, host)):
        for q, (rows, cols) in enumerate(on_host):
            got = on_device[q, :counts[q]]  # decoder query of target 0, 1, ...
            assert sorted(zip(cols.tolist(), rows.tolist())) == list(enumerate(got.tolist())), (layer, q)
            assert len(set(on_device[q].tolist())) == max(counts)  # padding slots take other decoder queries


def pad_queries(outputs, extra: int):
    """The outputs with ``extra`` padding queries appended (random predictions, one valid token)."""
    filler = random_outputs(99, num_q=extra, nq=outputs["pred_boxes"].shape[1],
                            slots=outputs["text_token_mask"].shape[1], padded_to=outputs["pred_logits"].shape[-1])

    def cat(layer, more):
        return {k: torch.cat([layer[k], more[k].detach()]) for k in ("pred_logits", "pred_boxes")}
    token_mask = torch.cat([outputs["text_token_mask"], filler["text_token_mask"]])
    return {**cat(outputs, filler), "text_token_mask": token_mask,
            "aux_outputs": [cat(a, b) for a, b in zip(outputs["aux_outputs"], filler["aux_outputs"])],
            "interm_outputs": cat(outputs["interm_outputs"], filler["interm_outputs"])}


@pytest.mark.parametrize("ce_normalization", ["num_boxes", "local_matches"])
def test_padding_queries_and_target_slots_changes_neither_losses_nor_gradients(ce_normalization):
    """What the CUDA-graphed step relies on: padding queries (query_mask False) and padding target slots
    (target_mask False) add nothing, so fixed shapes give the unpadded losses and gradients."""
    cfg = dataclasses.replace(VisionBranchConfig(), ce_normalization=ce_normalization)
    criterion = GroundingCriterion(cfg, solver="device")
    counts = [2, 1, 3, 0, 1]
    targets = random_targets(21, counts)
    ours = random_outputs(22, padded_to=6)
    theirs = clone_outputs(ours)
    want = criterion(theirs, targets)

    padded_layers = [layer for _, layer in criterion.loss_layers(pad_queries(ours, extra=3))]
    boxes = pad_target_boxes(targets + random_targets(23, [2, 2, 2]))  # padding queries have "targets" too
    boxes = torch.cat([boxes, torch.full((8, 2, 4), 0.5)], dim=1)  # and two padding slots each: K = 5
    target_mask = torch.cat([real_target_mask(counts + [0, 0, 0], 3), torch.zeros(8, 2, dtype=torch.bool)], 1)
    query_mask = torch.arange(8) < 5
    token_mask = torch.cat([ours["text_token_mask"], torch.ones(3, 3, dtype=torch.bool)])
    terms, _ = criterion.padded_terms(padded_layers, token_mask, boxes, target_mask, query_mask,
                                      torch.tensor(float(sum(counts))))
    got = criterion.named_losses(terms, [suffix for suffix, _ in criterion.loss_layers(ours)], "cpu")
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    got["loss"].backward()
    want["loss"].backward()
    for mine, ref in zip(leaves(ours), leaves(theirs)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ce_normalization", ["num_boxes", "local_matches"])
def test_criterion_with_device_matching_equals_the_reference(ce_normalization):
    cfg = dataclasses.replace(VisionBranchConfig(), ce_normalization=ce_normalization)
    ours = random_outputs(11, padded_to=6)
    theirs = clone_outputs(ours)
    targets = random_targets(12, [2, 1, 3, 0, 1])
    criterion = GroundingCriterion(cfg, solver="device")
    got = criterion(ours, targets)
    want, _ = reference_losses(theirs, targets, cfg.loss_weights, ce_normalization)
    assert list(got) == list(want)
    for name in want:  # pairs are summed in another order than the reference's: rounding only
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    got["loss"].backward()
    want["loss"].backward()
    for mine, ref in zip(leaves(ours), leaves(theirs)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-7)
    criterion.matcher.solver = "fast"
    with pytest.raises(ValueError, match="solver must be auto, scipy or device"):
        criterion(clone_outputs(ours), targets)


@pytest.mark.parametrize("solver", ["scipy", "device"])
def test_return_indices_gives_every_layers_matches_in_upstreams_order(solver):
    """Upstream's ``return_indices``: decoder layers 0..L-2, the encoder output, then the last layer; per
    query (decoder queries, targets) sorted by decoder query; the losses are those returned without it."""
    ours = random_outputs(31)
    targets = random_targets(32, [2, 1, 3, 0, 1])
    criterion = GroundingCriterion(solver=solver)
    losses, indices = criterion(ours, targets, return_indices=True)
    _, matches = reference_losses(clone_outputs(ours), targets, VisionBranchConfig().loss_weights)
    order = [f"_{i}" for i in range(len(ours["aux_outputs"]))] + ["_interm", ""]
    assert len(indices) == len(order)
    for suffix, layer in zip(order, indices):
        assert len(layer) == len(targets)
        for (rows, cols), (want_rows, want_cols) in zip(layer, matches[suffix]):
            assert rows.dtype == cols.dtype == torch.int64
            assert rows.tolist() == sorted(rows.tolist())
            assert sorted(zip(rows.tolist(), cols.tolist())) == sorted(zip(list(want_rows), list(want_cols)))
    without = criterion(clone_outputs(ours), targets)
    assert list(without) == list(losses)
    for name in losses:
        torch.testing.assert_close(losses[name], without[name])
