"""Hungarian matcher and grounding criterion on hand-checked cases (spec/upstream.md §1.6)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.GroundingDINO import GroundingCriterion, VisionBranchConfig
from tests.test_matcher_batched import match_layer
from model.GroundingDINO.criterion import sigmoid_focal_loss

REPO = Path(__file__).resolve().parents[1]


def _outputs(logits: torch.Tensor, boxes: torch.Tensor, aux_layers: int = 5) -> dict:
    """A forward_enc_dec-shaped dict whose every layer predicts the same thing."""
    layer = {"pred_logits": logits, "pred_boxes": boxes}
    return {**layer, "text_token_mask": torch.ones(logits.shape[0], logits.shape[-1], dtype=torch.bool),
            "aux_outputs": [dict(layer) for _ in range(aux_layers)], "interm_outputs": dict(layer)}


def _focal(logit: float, target: float, alpha=0.25, gamma=2.0) -> float:
    p = torch.sigmoid(torch.tensor(logit, dtype=torch.float64)).item()
    if target:
        return alpha * (1 - p) ** gamma * -torch.log(torch.tensor(p)).item()
    return (1 - alpha) * p ** gamma * -torch.log(torch.tensor(1 - p)).item()


def test_perfect_prediction_has_zero_box_losses_on_every_layer():
    targets = torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5]])
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], targets[1].tolist(), [0.2, 0.8, 0.1, 0.1],
                           targets[0].tolist(), [0.9, 0.1, 0.1, 0.1]]])
    logits = torch.tensor([[[-8.0], [8.0], [-8.0], [8.0], [-8.0]]])
    losses = GroundingCriterion()(_outputs(logits, boxes), [targets])
    # 21 weighted terms, loss_xy and loss_hw of each of the 7 layers (logged only), and "loss"
    assert len(losses) == 21 + 14 + 1
    for name, value in losses.items():
        if "bbox" in name or "_xy" in name or "_hw" in name:
            assert value.item() == pytest.approx(0.0, abs=1e-6), name
        if "giou" in name:  # upstream's +1e-6 in the denominators leaves ~1e-6 / box area per box
            assert 0 < value.item() < 1e-4, name
    assert losses["loss_ce"].item() < 1e-3


@pytest.mark.parametrize("solver", ["scipy", "device"])
def test_centre_and_size_l1_are_logged_per_layer_and_not_trained_on(solver):
    """Upstream's loss_xy / loss_hw: the L1 of the matched centres and of the sizes over the box count, for
    every layer (suffixes as the weighted terms), detached and outside the weighted loss."""
    targets = [torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5]]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])]
    boxes = torch.tensor([[[0.32, 0.37, 0.25, 0.2], [0.9, 0.1, 0.1, 0.1], [0.66, 0.6, 0.3, 0.45]],
                          [[0.1, 0.9, 0.1, 0.1], [0.55, 0.5, 0.4, 0.3], [0.9, 0.9, 0.1, 0.1]]], requires_grad=True)
    logits = torch.tensor([[[4.0], [-4.0], [4.0]], [[-4.0], [4.0], [-4.0]]])
    losses = GroundingCriterion(solver=solver)(_outputs(logits, boxes), targets)
    matched = {(0, 0): (0, 0), (0, 1): (0, 2), (1, 0): (1, 1)}  # (query, target) -> (query, decoder query)
    xy = sum((boxes[q, d, :2] - targets[q][t, :2]).abs().sum().item() for (q, t), (_, d) in matched.items()) / 3
    hw = sum((boxes[q, d, 2:] - targets[q][t, 2:]).abs().sum().item() for (q, t), (_, d) in matched.items()) / 3
    for suffix in ["", *(f"_{i}" for i in range(5)), "_interm"]:
        assert losses[f"loss_xy{suffix}"].item() == pytest.approx(xy, rel=1e-6)
        assert losses[f"loss_hw{suffix}"].item() == pytest.approx(hw, rel=1e-6)
        assert losses[f"loss_xy{suffix}"].item() + losses[f"loss_hw{suffix}"].item() == pytest.approx(
            losses[f"loss_bbox{suffix}"].item(), rel=1e-6)
        assert not losses[f"loss_xy{suffix}"].requires_grad and not losses[f"loss_hw{suffix}"].requires_grad
    weights = VisionBranchConfig().loss_weights
    assert not any("_xy" in k or "_hw" in k for k in weights)
    assert losses["loss"].item() == pytest.approx(sum(weights[k] * losses[k].item() for k in weights), rel=1e-6)


def test_a_permutation_of_queries_is_matched_back():
    targets = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.3], [0.8, 0.3, 0.2, 0.2], [0.4, 0.7, 0.3, 0.1]])
    permutation = torch.tensor([2, 0, 3, 1])
    boxes = targets[permutation][None]
    logits = torch.zeros(1, 4, 1)
    (pred_idx, tgt_idx), = match_layer(logits, boxes, torch.ones(1, 1, dtype=torch.bool), [targets])
    assert pred_idx.tolist() == [0, 1, 2, 3]
    assert tgt_idx.tolist() == permutation.tolist()


def test_focal_loss_matches_the_formula_by_hand():
    targets = [torch.tensor([[0.5, 0.5, 0.2, 0.2]])]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05], [0.9, 0.9, 0.05, 0.05]]])
    logits = torch.tensor([[[0.7], [-1.2], [0.3]]])
    losses = GroundingCriterion()(_outputs(logits, boxes), targets)
    expected = _focal(0.7, 1) + _focal(-1.2, 0) + _focal(0.3, 0)  # one target box -> normaliser 1
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    weights = VisionBranchConfig().loss_weights
    assert losses["loss"].item() == pytest.approx(sum(weights[k] * losses[k].item() for k in weights), rel=1e-5)
    element = sigmoid_focal_loss(torch.tensor([0.7]), torch.tensor([1.0]), 0.25, 2.0)
    assert element.item() == pytest.approx(_focal(0.7, 1), rel=1e-5)


def test_several_targets_per_query_and_a_query_without_targets():
    targets = [torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.2]]), torch.zeros(0, 4)]
    boxes = torch.rand(2, 6, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    logits = torch.randn(2, 6, 1, generator=torch.Generator().manual_seed(1))
    criterion = GroundingCriterion()
    matched = match_layer(logits, boxes, torch.ones(2, 1, dtype=torch.bool), targets)
    assert sorted(matched[0][1].tolist()) == [0, 1, 2] and matched[1][0].numel() == 0
    losses = criterion(_outputs(logits, boxes), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # L1 over the three matched pairs, divided by the three target boxes.
    pred = boxes[0, matched[0][0]]
    expected_l1 = (pred - targets[0][matched[0][1]]).abs().sum().item() / 3
    assert losses["loss_bbox"].item() == pytest.approx(expected_l1, rel=1e-5)
    # Query 1 has no target: all of its 6 decoder queries are negatives in the focal loss.
    negatives_q1 = sum(_focal(v, 0) for v in logits[1, :, 0].tolist())
    positives_q0 = sum(_focal(logits[0, i, 0].item(), 1) for i in matched[0][0].tolist())
    negatives_q0 = sum(_focal(logits[0, i, 0].item(), 0) for i in range(6) if i not in matched[0][0].tolist())
    assert losses["loss_ce"].item() == pytest.approx((negatives_q1 + positives_q0 + negatives_q0) / 3, rel=1e-5)


def test_upstream_ce_normalisation_switch():
    targets = [torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.6, 0.6, 0.2, 0.2]])]
    boxes, logits = torch.tensor([[[0.2, 0.2, 0.1, 0.1]]]), torch.tensor([[[0.5]]])  # 1 decoder query, 2 targets
    ours = GroundingCriterion()(_outputs(logits, boxes), targets)["loss_ce"]
    upstream = GroundingCriterion(dataclasses.replace(VisionBranchConfig(), ce_normalization="local_matches"))(
        _outputs(logits, boxes), targets)["loss_ce"]
    assert upstream.item() == pytest.approx(2 * ours.item(), rel=1e-6)
    # More boxes than predictions: the one prediction takes its nearest box, the other box stays unmatched.
    losses, indices = GroundingCriterion()(_outputs(logits, boxes), targets, return_indices=True)
    assert all([(r.tolist(), c.tolist()) for r, c in layer] == [([0], [0])] for layer in indices)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)


def test_matcher_tolerates_nan_and_inf_costs():
    boxes = torch.tensor([[[float("nan"), 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    logits = torch.tensor([[[float("inf")], [0.0]]])
    (pred_idx, tgt_idx), = match_layer(logits, boxes, torch.ones(1, 1, dtype=torch.bool),
                                       [torch.tensor([[0.5, 0.5, 0.2, 0.2]])])
    assert pred_idx.numel() == 1 and tgt_idx.tolist() == [0]


def test_rank_without_grounding_queries_returns_zero_and_needs_a_device():
    losses = GroundingCriterion()(None, [], device="cpu")
    assert losses["loss"].item() == 0.0
    with pytest.raises(ValueError, match="device"):
        GroundingCriterion()(None, [])


_TWO_RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.environ["REPO"])
    from model.GroundingDINO import GroundingCriterion
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    criterion = GroundingCriterion()
    if rank == 0:  # 3 target boxes here, none on rank 1 -> 1.5 boxes per rank
        targets = [torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]])]
        boxes = targets[0][None] + 0.01
        layer = {"pred_logits": torch.zeros(1, 3, 1), "pred_boxes": boxes}
        outputs = {**layer, "text_token_mask": torch.ones(1, 1, dtype=torch.bool), "aux_outputs": [],
                   "interm_outputs": layer}
        print("loss_bbox", criterion(outputs, targets)["loss_bbox"].item())
    else:
        print("loss", criterion(None, [], device="cpu")["loss"].item())
    dist.destroy_process_group()
""")


def test_box_count_is_averaged_over_ranks_and_an_empty_rank_does_not_hang(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANK_SCRIPT)
    env = {**os.environ, "REPO": str(REPO), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert float(results[0][0].split()[-1]) == pytest.approx(3 * 4 * 0.01 / 1.5, rel=1e-4)
    assert float(results[1][0].split()[-1]) == 0.0
