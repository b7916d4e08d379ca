"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression comprehension (REC): Acc@0.5 per split.

    python evaluation/rec.py --config CONFIG --dataset refcoco|refcoco+|refcocog [--checkpoint DIR]
        [--data REFER_DIR] [--splits val testA testB] [--template "Where is {expression}?"] [--output-dir DIR]
        [--visualize N]
    torchrun --nproc_per_node 8 evaluation/rec.py ...

One grounding question per referring expression (sentence) of each split: template(expression) +
" [VG]"; the GT is the referred object's box (instances.json). Upstream released no REC evaluation;
this is the standard protocol. Writes predictions.jsonl (resumable), prediction.json (upstream's
grounding layout plus "split"), summary.json/.md; the last line printed is the metrics JSON with
``accuracy`` per split (= success rate at IoU 0.5) and the pooled grounding metrics.
"""
from __future__ import annotations

import os

from chatterbox.eval.cli import (add_grounding_arguments, add_visualize_argument, entry_point, print_outcome,
                                 resolve_box_threshold, run_fields, run_single_round, runner_parser,
                                 score_grounding_run, write_visualizations)


def parse_args(argv=None):
    from chatterbox.eval.questions import DEFAULT_REC_TEMPLATE

    p = runner_parser(__doc__)
    p.add_argument("--dataset", required=True, choices=["refcoco", "refcoco+", "refcocog"])
    p.add_argument("--split-by", default="", help="default: unc for refcoco/refcoco+, umd for refcocog")
    p.add_argument("--splits", nargs="+", default=None, help="default: val testA testB (val test for refcocog)")
    p.add_argument("--template", default=DEFAULT_REC_TEMPLATE)
    p.add_argument("--image-dir", default="", help="default: <data.paths.coco2014_dir>/train2014")
    add_grounding_arguments(p)
    add_visualize_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from chatterbox.data.readers.refcoco import DEFAULT_SPLIT_BY
    from chatterbox.eval import questions as Q
    from chatterbox.eval.reports import write_markdown_report, write_summary_json
    from chatterbox.eval.runner import setup_runner

    args = parse_args(argv)
    s = setup_runner(args, f"rec_{args.dataset}")
    splits = args.splits or list(Q.REC_SPLITS[args.dataset])
    image_dir = args.image_dir or os.path.join(s.cfg.data.paths.coco2014_dir, "train2014")
    items = Q.rec_items(args.data or s.cfg.data.paths.refer_dir, args.dataset,
                        args.split_by or DEFAULT_SPLIT_BY[args.dataset], splits, image_dir, args.template,
                        s.cfg.data.vg_separator)
    items, records_out, stats = run_single_round(s, items, limit=args.limit,
                                                 box_threshold=resolve_box_threshold(args, s.cfg))
    if not s.dist.is_main:
        return 0
    num_entries, predictions, evaluation = score_grounding_run(s, items, records_out, args.iou_threshold,
                                                               group_field="split")
    result = {"dataset": args.dataset,
              "accuracy": {k: g.success_rate for k, g in evaluation.groups.items()},
              **evaluation.to_dict()}
    write_summary_json(s.output_dir / "summary.json", {"benchmark": "rec", **run_fields(args, stats), **result})
    rows = {split: {"Acc@0.5": g.success_rate, "num_correct": g.num_success, "num_samples": g.num_samples,
                    "miou": g.miou} for split, g in evaluation.groups.items()}
    write_markdown_report(s.output_dir / "summary.md", f"{args.dataset} REC", rows,
                          ["Acc@0.5", "num_correct", "num_samples", "miou"])
    write_visualizations(predictions.records, evaluation.ious.tolist(), s.output_dir, args.visualize)
    print_outcome(s.output_dir / "prediction.json", num_entries, stats, result)
    return 0


if __name__ == "__main__":
    entry_point(main)
