"""Draw labelled boxes on an image (CLI --save-image, evaluation visualisations)."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from chatterbox.boxes import as_box_tensor

#: Colours that stay readable on photos; cycled per box.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))
REGION_COLOUR = (255, 200, 0)  # user regions (<bbox>) in one colour, predictions from PALETTE


def draw_boxes(image: Image.Image, boxes_xyxy_abs: Sequence[Sequence[float]] | torch.Tensor,
               labels: Sequence[str] | None = None, colours: Sequence[tuple[int, int, int]] | None = None,
               line_width: int | None = None) -> Image.Image:
    """A copy of ``image`` with each box (original-image pixels, xyxy) outlined and labelled."""
    boxes = as_box_tensor(boxes_xyxy_abs).reshape(-1, 4).tolist() if len(boxes_xyxy_abs) else []
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"{len(labels)} labels for {len(boxes)} boxes")
    out = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(out)
    side = max(out.width, out.height)
    width = line_width or max(2, round(side / 250))
    font = ImageFont.load_default(size=max(12, round(side / 40)))
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        colour = tuple(colours[i % len(colours)]) if colours else PALETTE[i % len(PALETTE)]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        if labels is None or not labels[i]:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), labels[i], font=font)
        text_w, text_h = right - left, bottom - top
        # Above the box when there is room, else inside its top edge.
        ty = y1 - text_h - 2 * width if y1 - text_h - 2 * width >= 0 else y1 + width
        tx = min(max(x1, 0), max(out.width - text_w - 2 * width, 0))
        draw.rectangle([tx, ty, tx + text_w + 2 * width, ty + text_h + 2 * width], fill=colour)
        draw.text((tx + width - left, ty + width - top), labels[i], fill=(255, 255, 255), font=font)
    return out


def draw_round(image: Image.Image, region_boxes_xyxy_abs, reply) -> Image.Image:
    """The user's regions (``region k``) and the reply's predicted boxes (``box k score``) on ``image``."""
    regions = as_box_tensor(region_boxes_xyxy_abs).reshape(-1, 4) if len(region_boxes_xyxy_abs) else torch.zeros(0, 4)
    predicted = reply.boxes_xyxy_abs.reshape(-1, 4)
    boxes = torch.cat([regions.float(), predicted.float()])
    labels = [f"region {k + 1}" for k in range(len(regions))]
    labels += [f"box {k + 1} {float(s):.2f}" for k, s in enumerate(reply.scores.tolist())]
    colours = [REGION_COLOUR] * len(regions) + [PALETTE[k % len(PALETTE)] for k in range(len(predicted))]
    return draw_boxes(image, boxes, labels, colours)
