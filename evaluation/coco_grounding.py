"""COCO val2017 single-round grounding with a model: questions -> generation -> prediction.json -> metrics.

    python evaluation/coco_grounding.py --config CONFIG [--checkpoint EXPORT_DIR] [--data COCO2017_DIR]
        [--questions grounding_qa.json] [--image-dir DIR] [--output-dir DIR] [--batch-size N] [--limit N]
        [--visualize N] [--query-swap]
    torchrun --nproc_per_node 8 evaluation/coco_grounding.py ...      # sharded; same files as one process

Questions: built from <data>/annotations/instances_val2017.json as upstream does (3,422 on COCO;
written to <output-dir>/grounding_qa.json), or read from upstream's grounding_qa.json (--questions).
Prompt = question + " [VG]". Writes predictions.jsonl (incremental; a rerun resumes), upstream's
prediction.json, summary.json and summary.md; the last line printed is the metrics JSON (miou,
success_rate, miou_at_success, num_samples, ...), the same as eval_grounding.py on prediction.json.
--visualize N draws the first N predictions (GT green, prediction red) to <output-dir>/visualizations.
--query-swap adds success_rate_query_swapped: each question answered with the [VG] query of another
question about the same image (grounding_metrics.evaluate_query_swap), the control for "the box
follows the words"; and, for names of several words, success_rate_by_shared_word: the success rate where
another shape of the image shares word k of the name, beside the chance of a model blind to the other words
(grounding_metrics.evaluate_shared_words; on the synthetic split: does the box follow the colour, the kind).
"""
from __future__ import annotations

import json
import os

from chatterbox.eval.cli import (add_grounding_arguments, add_query_swap_argument, add_visualize_argument, entry_point, print_outcome,
                                 query_swap_fields, resolve_box_threshold, run_fields, run_single_round,
                                 runner_parser, score_grounding_run, write_visualizations)


def parse_args(argv=None):
    p = runner_parser(__doc__)
    p.add_argument("--questions", default="", help="upstream grounding_qa.json instead of building from instances")
    p.add_argument("--image-dir", default="", help="default: <data>/val2017")
    add_grounding_arguments(p)
    add_query_swap_argument(p)
    add_visualize_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from chatterbox.eval import questions as Q
    from chatterbox.eval.grounding_metrics import evaluate_shared_words
    from chatterbox.eval.reports import write_markdown_report, write_summary_json
    from chatterbox.eval.runner import setup_runner

    args = parse_args(argv)
    s = setup_runner(args, "coco_grounding")
    data = args.data or s.cfg.data.paths.coco2017_dir
    if args.questions:
        with open(args.questions) as f:
            records, source = json.load(f), args.questions
    else:
        source = os.path.join(data, "annotations", "instances_val2017.json")
        records = Q.coco_grounding_qa(source)
        if s.dist.is_main:
            Q.write_grounding_qa(records, str(s.output_dir / "grounding_qa.json"))
    items = Q.coco_grounding_items(records, args.image_dir or os.path.join(data, "val2017"),
                                   os.path.basename(source), s.cfg.data.vg_separator)
    items, records_out, stats = run_single_round(s, items, limit=args.limit,
                                                 box_threshold=resolve_box_threshold(args, s.cfg))
    if not s.dist.is_main:
        return 0
    num_entries, predictions, evaluation = score_grounding_run(s, items, records_out, args.iou_threshold)
    result = evaluation.to_dict()
    if args.query_swap:
        result.update(query_swap_fields(predictions.records, args.iou_threshold))
        names = [item.upstream.get("catgory") for item in items]  # upstream's spelling of the key
        if all(names):
            result["success_rate_by_shared_word"] = evaluate_shared_words(
                predictions.records, names, iou_threshold=args.iou_threshold)
    summary = {"benchmark": "coco_grounding", "questions": source, **run_fields(args, stats),
               "world_size": s.dist.world_size, **result}
    write_summary_json(s.output_dir / "summary.json", summary)
    write_markdown_report(s.output_dir / "summary.md", "COCO val2017 grounding", {"all": result},
                          ["miou", "success_rate", "miou_at_success", "num_success", "num_samples", "num_fallback"],
                          notes=[f"questions: {source}", f"checkpoint: {summary['checkpoint']}"])
    write_visualizations(predictions.records, evaluation.ious.tolist(), s.output_dir, args.visualize)
    print_outcome(s.output_dir / "prediction.json", num_entries, stats, result)
    return 0


if __name__ == "__main__":
    entry_point(main)
