#!/usr/bin/env python
"""Grounding success on the synthetic COCO split, by how many other shapes of the image share the named
shape's kind (then only the colour tells them apart) or its colour (then only the kind does).

Reads an evaluation folder of evaluation/coco_grounding.py (grounding_qa.json: every shape of every image is
asked about; prediction.json) and prints, for 0, 1, 2, ... such shapes, the number of questions and the
success rate (IoU >= 0.5). A model blind to the colour scores 1/(n+1) with n same-kind shapes beside the
named one. (`--query-swap` runs report the pooled form of this: success_rate_by_shared_word.)

    python docs/results/tiny_recipe/query_path/grounding_by_distractor.py EVAL_DIR
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from chatterbox.eval.grounding_metrics import iou_per_item, read_upstream_grounding_predictions


def main() -> None:
    folder = Path(sys.argv[1])
    questions = json.loads((folder / "grounding_qa.json").read_text())
    records = read_upstream_grounding_predictions(folder / "prediction.json").records
    if len(records) != len(questions):
        raise ValueError(f"{len(records)} predictions for {len(questions)} questions in {folder}")
    ious = iou_per_item([r.pred_box_xyxy_abs for r in records], [r.gt_box_xyxy_abs for r in records]).tolist()
    names = defaultdict(list)
    for q in questions:
        names[q["image_id"]].append(q["catgory"])  # upstream's spelling of the key
    count, success = Counter(), Counter()
    for q, iou in zip(questions, ious):
        colour, kind = q["catgory"].split()
        others = [name.split() for name in names[q["image_id"]] if name != q["catgory"]]
        for key in (f"same_kind_others={sum(k == kind for _, k in others)}",
                    f"same_colour_others={sum(c == colour for c, _ in others)}"):
            count[key] += 1
            success[key] += iou >= 0.5
    print(json.dumps({"eval_dir": str(folder), **{key: {"questions": count[key], "success_rate": round(
        success[key] / count[key], 3)} for key in sorted(count)}}))


if __name__ == "__main__":
    main()
