"""Single-round grounding metrics (mIoU, success rate, mIoU@success) of a predictions file.

    python evaluation/eval_grounding.py --predictions prediction.json [--questions grounding_qa.json]
        [--missing error|zero] [--iou-threshold 0.5] [--group-by FIELD]
        [--out-dir DIR [--visualize N --image-root DIR]] [--query-swap]

Reads upstream's prediction.json as is (gt: COCO xywh floats, out_boxes: pixel xyxy). The last line
printed is a JSON object with miou, success_rate, miou_at_success, num_samples (unrounded), plus
num_success, num_missing, num_fallback, iou_threshold and, with --group-by, per-group summaries
(e.g. REC Acc@0.5 per split: the success_rate of each group). --query-swap adds the query-swap control
(success_rate_query_swapped: each question scored with the box another question about the same image got).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from chatterbox.eval.cli import add_query_swap_argument, query_swap_fields
from chatterbox.eval.grounding_metrics import (
    DEFAULT_IOU_THRESHOLD,
    MISSING_POLICIES,
    GroundingInputError,
    evaluate_grounding,
    read_upstream_grounding_predictions,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="upstream prediction.json (list of {gt, out_boxes, score, ...})")
    p.add_argument("--questions", "--references", dest="questions", default=None,
                   help="upstream grounding_qa.json; predictions are matched to it by position and checked")
    p.add_argument("--missing", choices=MISSING_POLICIES, default="error",
                   help="an entry without a box: 'error' (default) or 'zero' (IoU 0, counted, kept in the denominator)")
    p.add_argument("--iou-threshold", type=float, default=DEFAULT_IOU_THRESHOLD)
    p.add_argument("--group-by", default=None, help="entry field to break the metrics down by (e.g. split)")
    p.add_argument("--out-dir", default=None, help="write summary.json and summary.md here")
    p.add_argument("--visualize", type=int, default=0, metavar="N", help="with --out-dir: draw N predictions as PNG")
    p.add_argument("--image-root", default=None, help="folder holding the images (replaces the files' absolute dirs)")
    add_query_swap_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.visualize and not args.out_dir:
        print("error: --visualize needs --out-dir", file=sys.stderr)
        return 2
    try:
        predictions = read_upstream_grounding_predictions(
            args.predictions, missing=args.missing, questions_path=args.questions, group_field=args.group_by
        )
    except GroundingInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    evaluation = evaluate_grounding(predictions, iou_threshold=args.iou_threshold)
    result = evaluation.to_dict()
    if args.query_swap:
        result.update(query_swap_fields(predictions.records, args.iou_threshold))
    s = evaluation.summary

    print(f"predictions: {args.predictions} ({s.num_samples} questions, {s.num_missing} missing counted as IoU 0, "
          f"{evaluation.num_fallback} upstream fallback boxes)")
    print(f"mIoU {s.miou:.4f} | success rate (IoU>={s.iou_threshold}) {s.success_rate:.4f} "
          f"({s.num_success}/{s.num_samples}) | mIoU@success "
          + (f"{s.miou_at_success:.4f}" if s.miou_at_success is not None else "-"))
    for name, g in evaluation.groups.items():
        print(f"  [{args.group_by}={name}] Acc@{g.iou_threshold} {g.success_rate:.4f} ({g.num_success}/{g.num_samples}) "
              f"mIoU {g.miou:.4f}")

    if args.out_dir:
        from chatterbox.eval.reports import visualize_grounding, write_markdown_report, write_summary_json

        write_summary_json(f"{args.out_dir}/summary.json", {"predictions": args.predictions, **result})
        rows = {"all": s.to_dict(), **{f"{args.group_by}={k}": g.to_dict() for k, g in evaluation.groups.items()}}
        write_markdown_report(
            f"{args.out_dir}/summary.md", "Grounding", rows,
            ["miou", "success_rate", "miou_at_success", "num_success", "num_samples", "num_missing"],
            notes=[f"predictions: {args.predictions}", f"upstream fallback boxes: {evaluation.num_fallback}"],
        )
        if args.visualize:
            vis = visualize_grounding(predictions.records, evaluation.ious.tolist(), f"{args.out_dir}/visualizations",
                                      num_images=args.visualize, image_root=args.image_root)
            print(f"visualisations: {len(vis.written)} written, {len(vis.skipped)} skipped (image not found)")
        print(f"reports written to {args.out_dir}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
