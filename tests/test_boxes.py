import math

import pytest
import torch

from chatterbox import boxes as B


def test_layout_round_trips():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.0, 2.0]])
    assert torch.equal(B.xyxy_to_xywh(xyxy), torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 1.0, 2.0]]))
    assert torch.equal(B.xyxy_to_cxcywh(xyxy), torch.tensor([[30.0, 50.0, 40.0, 60.0], [0.5, 1.0, 1.0, 2.0]]))
    for layout in B.BOX_LAYOUTS:
        there = B.convert_layout(xyxy, "xyxy", layout)
        assert torch.allclose(B.convert_layout(there, layout, "xyxy"), xyxy)
    with pytest.raises(ValueError, match="unknown box layout"):
        B.convert_layout(xyxy, "xyxy", "yxyx")


def test_normalise_and_back():
    xyxy = torch.tensor([[64.0, 32.0, 128.0, 96.0]])
    norm = B.normalize(xyxy, width=256, height=128)
    assert torch.equal(norm, torch.tensor([[0.25, 0.25, 0.5, 0.75]]))
    assert torch.equal(B.denormalize(norm, 256, 128), xyxy)


def test_iou_hand_checked():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # half overlap: 50 / 150
    assert B.elementwise_iou(a, b).item() == pytest.approx(1 / 3)
    assert B.pairwise_iou(a, b).item() == pytest.approx(1 / 3)
    far = torch.tensor([[20.0, 0.0, 30.0, 10.0]])
    assert B.elementwise_iou(a, far).item() == 0.0
    # GIoU: hull is 30x10=300, union 200 -> 0 - 100/300.
    assert B.elementwise_giou(a, far).item() == pytest.approx(-1 / 3)
    assert B.pairwise_giou(a, far).item() == pytest.approx(-1 / 3)
    assert B.elementwise_iou(a, a).item() == 1.0


def test_elementwise_matches_pairwise_diagonal():
    g = torch.Generator().manual_seed(0)
    p1 = torch.rand(20, 2, generator=g) * 50
    p2 = p1 + torch.rand(20, 2, generator=g) * 50 + 1
    boxes1 = torch.cat([p1, p2], 1)
    boxes2 = boxes1 + torch.randn(20, 4, generator=g) * 5
    boxes2[:, 2:] = torch.maximum(boxes2[:, 2:], boxes2[:, :2] + 1)
    assert torch.allclose(B.elementwise_iou(boxes1, boxes2), B.pairwise_iou(boxes1, boxes2).diagonal())
    assert torch.allclose(B.elementwise_giou(boxes1, boxes2), B.pairwise_giou(boxes1, boxes2).diagonal(), atol=1e-6)


def test_degenerate_pair_has_zero_iou_not_nan():
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert B.elementwise_iou(z, z).item() == 0.0


@pytest.mark.parametrize(
    "box, match",
    [
        ([0, 0, 0, 10], "zero or negative size"),
        ([5, 5, 2, 8], "zero or negative size"),
        ([0, 0, math.nan, 10], "not a finite number"),
        ([0, 0, 500, 10], "outside the 100x50 image"),
    ],
)
def test_validate_rejects_bad_boxes_and_names_them(box, match):
    with pytest.raises(B.BoxError, match=match) as err:
        B.validate_xyxy([box], width=100, height=50, where="refs.json record 3 field bbox")
    assert "record 3" in str(err.value)


def test_validate_rejects_wrong_arity():
    with pytest.raises(B.BoxError, match="size 4"):
        B.as_box_tensor([1.0, 2.0, 3.0])


def test_elementwise_giou_is_upstreams_formula_in_float64():
    """GroundingDINO's box_ops.generalized_box_iou (upstream's matcher and criterion) adds 1e-6 to the union
    and to the hull; in float64 ours equals that formula to rounding, and differs from the one without."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=g, dtype=torch.float64) * 0.8
    boxes1 = torch.cat([xy, xy + 0.02 + 0.2 * torch.rand(64, 2, generator=g, dtype=torch.float64)], dim=1)
    xy = torch.rand(64, 2, generator=g, dtype=torch.float64) * 0.8
    boxes2 = torch.cat([xy, xy + 0.02 + 0.2 * torch.rand(64, 2, generator=g, dtype=torch.float64)], dim=1)

    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter = ((torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)).prod(1)
    union = area1 + area2 - inter
    hull = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(1)
    upstream = inter / (union + 1e-6) - (hull - union) / (hull + 1e-6)

    ours = B.elementwise_giou(boxes1, boxes2)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, upstream, rtol=0, atol=1e-15)
    assert (B.elementwise_giou(boxes1, boxes2, eps=0.0) - upstream).abs().max() > 1e-6
