"""Box formats and overlap measures: the one place where boxes change format.

Formats are named in variables as ``boxes_<layout>_<scale>``:

* layout ``xyxy`` (corners), ``xywh`` (COCO: top-left + size), ``cxcywh`` (centre + size);
* scale ``abs`` (pixels of some image) or ``norm`` (divided by that image's width/height).

Every function takes and returns tensors of shape ``[..., 4]``; the helpers accept lists too.
IoU/GIoU use torchvision.ops where it has them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import box_iou, generalized_box_iou

__all__ = [
    "BOX_LAYOUTS",
    "as_box_tensor",
    "convert_layout",
    "xyxy_to_xywh",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "normalize",
    "denormalize",
    "box_area",
    "pairwise_iou",
    "pairwise_giou",
    "elementwise_iou",
    "elementwise_giou",
    "validate_xyxy",
    "BoxError",
]

BOX_LAYOUTS = ("xyxy", "xywh", "cxcywh")


class BoxError(ValueError):
    """A box that is malformed: wrong length, NaN/inf, zero or negative size, outside its image."""


def as_box_tensor(boxes, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Lists, tuples, numpy arrays or tensors of boxes -> a float tensor of shape [..., 4]."""
    t = torch.as_tensor(boxes, dtype=dtype) if not isinstance(boxes, torch.Tensor) else boxes
    if not t.is_floating_point():
        t = t.to(dtype)
    if t.ndim == 0 or t.shape[-1] != 4:
        raise BoxError(f"boxes must have a last dimension of size 4, got shape {tuple(t.shape)}")
    return t


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


_TO_XYXY = {"xyxy": lambda b: b, "xywh": xywh_to_xyxy, "cxcywh": cxcywh_to_xyxy}
_FROM_XYXY = {"xyxy": lambda b: b, "xywh": xyxy_to_xywh, "cxcywh": xyxy_to_cxcywh}


def convert_layout(boxes: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Convert between the layouts of BOX_LAYOUTS (the scale is unchanged)."""
    for name in (src, dst):
        if name not in BOX_LAYOUTS:
            raise ValueError(f"unknown box layout {name!r}; expected one of {BOX_LAYOUTS}")
    if src == dst:
        return boxes
    return _FROM_XYXY[dst](_TO_XYXY[src](boxes))


def _scale(width: float, height: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([width, height, width, height], dtype=like.dtype, device=like.device)


def normalize(boxes_abs: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Pixels of a (width, height) image -> fractions of it. Works for every layout."""
    return boxes_abs / _scale(width, height, boxes_abs)


def denormalize(boxes_norm: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Fractions of a (width, height) image -> its pixels. Works for every layout."""
    return boxes_norm * _scale(width, height, boxes_norm)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Area without the +1 pixel convention (as upstream's evaluator and torchvision)."""
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def pairwise_iou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """[N,4] x [M,4] -> [N,M] IoU."""
    return box_iou(boxes1_xyxy, boxes2_xyxy)


def pairwise_giou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """[N,4] x [M,4] -> [N,M] generalised IoU."""
    return generalized_box_iou(boxes1_xyxy, boxes2_xyxy)


def _intersection_union(a: torch.Tensor, b: torch.Tensor):
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def elementwise_iou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows: [...,4] x [...,4] -> [...]. A pair with zero union has IoU 0."""
    inter, union = _intersection_union(boxes1_xyxy, boxes2_xyxy)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


#: upstream's GIoU (GroundingDINO's box_ops.generalized_box_iou, used by its matcher and criterion) adds this
#: to the union and to the hull area before dividing
GIOU_EPS = 1e-6


def elementwise_giou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor, eps: float = GIOU_EPS) -> torch.Tensor:
    """Generalised IoU of matching rows: the diagonal of upstream's N x M GIoU matrix, without the matrix;
    ``eps`` in both denominators as upstream (0 gives the textbook formula)."""
    inter, union = _intersection_union(boxes1_xyxy, boxes2_xyxy)
    iou = inter / (union + eps)
    lt = torch.minimum(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])
    rb = torch.maximum(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + eps)


def validate_xyxy(
    boxes_xyxy_abs: Sequence[Sequence[float]] | torch.Tensor,
    width: float | None = None,
    height: float | None = None,
    where: str = "box",
    tolerance: float = 1.0,
) -> torch.Tensor:
    """Check pixel xyxy boxes and return them as a tensor, or raise BoxError naming ``where``.

    A box must be finite, have positive width and height, and (when the image size is given) lie
    inside the image, allowing ``tolerance`` pixels of rounding slack.
    """
    t = as_box_tensor(boxes_xyxy_abs).reshape(-1, 4)
    for i, box in enumerate(t.tolist()):
        label = f"{where}[{i}]={box}"
        if not all(map(lambda v: v == v and abs(v) != float("inf"), box)):
            raise BoxError(f"{label}: not a finite number")
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1:
            raise BoxError(f"{label}: zero or negative size (expected x1 < x2 and y1 < y2)")
        if width is not None and height is not None:
            if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
                raise BoxError(f"{label}: outside the {width}x{height} image")
    return t
