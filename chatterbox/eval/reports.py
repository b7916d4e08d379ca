"""Run reports: a summary JSON, a markdown table, and PNGs of grounding predictions.

The writers take plain dicts so every evaluator (grounding, referring, multi-round) shares them.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "write_summary_json",
    "markdown_table",
    "write_markdown_report",
    "visualize_grounding",
    "VisualizationResult",
]

logger = logging.getLogger(__name__)

GT_COLOR = (0, 200, 0)
PRED_COLOR = (230, 30, 30)


def write_summary_json(path: str | Path, summary: Mapping) -> Path:
    """Write ``summary`` as indented JSON (unrounded floats); NaN/inf are refused, not written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, allow_nan=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def _cell(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Mapping[str, Mapping],
    columns: Sequence[str] | None = None,
    *,
    row_header: str = "run",
    digits: int = 4,
) -> str:
    """``{row name: {column: value}}`` -> a markdown table; floats rounded to ``digits`` for display."""
    if not rows:
        raise ValueError("no rows for the table")
    if columns is None:
        columns = []
        for metrics in rows.values():
            columns += [k for k, v in metrics.items() if k not in columns and not isinstance(v, (dict, list))]
    lines = [
        "| " + " | ".join([row_header, *columns]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for name, metrics in rows.items():
        lines.append("| " + " | ".join([str(name), *(_cell(metrics.get(c), digits) for c in columns)]) + " |")
    return "\n".join(lines) + "\n"


def write_markdown_report(
    path: str | Path,
    title: str,
    rows: Mapping[str, Mapping],
    columns: Sequence[str] | None = None,
    *,
    notes: Iterable[str] = (),
    digits: int = 4,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"# {title}", "", markdown_table(rows, columns, digits=digits)]
    notes = list(notes)
    if notes:
        body += [*(f"- {n}" for n in notes), ""]
    path.write_text("\n".join(body))
    return path


@dataclass
class VisualizationResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # image paths that were not found


def _resolve_image(image_path: str | None, image_root: str | Path | None) -> Path | None:
    if not image_path:
        return None
    # Upstream files carry absolute paths of the authors' machine; --image-root re-homes the basename.
    candidate = Path(image_root) / Path(image_path).name if image_root is not None else Path(image_path)
    return candidate if candidate.is_file() else None


def visualize_grounding(
    records: Sequence,
    ious: Sequence[float],
    out_dir: str | Path,
    *,
    num_images: int,
    image_root: str | Path | None = None,
) -> VisualizationResult:
    """Draw GT (green) and predicted (red) boxes of the first ``num_images`` records whose image exists.

    ``records`` are :class:`chatterbox.eval.grounding_metrics.GroundingRecord`; records whose image is
    missing are skipped and counted (one warning with the count, not one per image).
    """
    from PIL import Image, ImageDraw

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    skipped: list[str] = []
    for record, iou in zip(records, ious):
        if len(written) >= num_images:
            break
        image_file = _resolve_image(record.image_path, image_root)
        if image_file is None:
            skipped.append(str(record.image_path))
            continue
        with Image.open(image_file) as im:
            canvas = im.convert("RGB")
        draw = ImageDraw.Draw(canvas)
        width = max(2, round(min(canvas.size) / 200))
        draw.rectangle(list(record.gt_box_xyxy_abs), outline=GT_COLOR, width=width)
        if record.pred_box_xyxy_abs is not None:
            draw.rectangle(list(record.pred_box_xyxy_abs), outline=PRED_COLOR, width=width)
        label = f"#{record.index} IoU={float(iou):.3f}"
        if record.prompt:
            label += f"  {record.prompt}"
        draw.rectangle([0, 0, min(canvas.size[0], 8 + 7 * len(label)), 16], fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255))
        target = out_dir / f"grounding_{record.index:06d}.png"
        canvas.save(target)
        written.append(target)
    if skipped:
        logger.warning("visualisation: %d image(s) not found and skipped (first: %s)", len(skipped), skipped[0])
    return VisualizationResult(written, skipped)
