"""CB-MRG multi-round referring and grounding evaluation (protocol: evaluation/README.md, "CB-MRG").

    python evaluation/cb_mrg.py --config CONFIG [--checkpoint EXPORT_DIR] [--data CB_MRG.json or CB-300K dir]
        [--image-dir VG_DIR] [--history model|ground_truth] [--history-tokens plain|keep]
        [--regions auto|off] [--grounding auto|off] [--max-rounds N] [--no-meteor | --no-caption-metrics]
        [--visualize N] [--output-dir DIR]
    torchrun --nproc_per_node 8 evaluation/cb_mrg.py ...

Each dialogue's rounds run in order on the model's own earlier answers (default) or the ground-truth
ones. Writes predictions.jsonl (one line per dialogue with every round; resumable), summary.json and
summary.md (overall and per round index); the last line printed is the metrics JSON.
"""
from __future__ import annotations

import os

from chatterbox.eval.cli import (add_caption_metric_arguments, add_grounding_arguments, add_visualize_argument,
                                 caption_scorer, entry_point, print_outcome, resolve_box_threshold, run_fields,
                                 runner_parser, write_visualizations)


def parse_args(argv=None):
    p = runner_parser(__doc__)
    p.add_argument("--image-dir", default="", help="default: data.paths.vg_dir")
    p.add_argument("--history", default="model", choices=["model", "ground_truth"])
    p.add_argument("--history-tokens", default="plain", choices=["plain", "keep"])
    p.add_argument("--regions", default="auto", choices=["auto", "off"])
    p.add_argument("--grounding", default="auto", choices=["auto", "off"])
    p.add_argument("--max-rounds", type=int, default=0, help="use at most N rounds per dialogue (0 = all)")
    p.add_argument("--bad-records", default="error", choices=["error", "skip-and-count"])
    add_grounding_arguments(p)
    add_caption_metric_arguments(p)
    add_visualize_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from chatterbox.data.errors import BadRecordPolicy
    from chatterbox.eval.mrg import MrgRunOptions, evaluate_mrg, mrg_grounding_records, mrg_predictor
    from chatterbox.eval.questions import MrgOptions, mrg_dialogues
    from chatterbox.eval.reports import write_markdown_report, write_summary_json
    from chatterbox.eval.runner import run_items, setup_runner

    args = parse_args(argv)
    s = setup_runner(args, f"cb_mrg_{args.history}")
    data = args.data or s.cfg.data.paths.cb300k_dir
    path = os.path.join(data, "CB_MRG.json") if os.path.isdir(data) else data
    policy = BadRecordPolicy(args.bad_records)
    dialogues = mrg_dialogues(path, args.image_dir or s.cfg.data.paths.vg_dir,
                              MrgOptions(regions=args.regions, grounding=args.grounding,
                                         vg_separator=s.cfg.data.vg_separator, max_rounds=args.max_rounds),
                              policy, limit=args.limit)
    options = MrgRunOptions(history=args.history, history_tokens=args.history_tokens,
                            max_new_tokens=s.max_new_tokens, box_threshold=resolve_box_threshold(args, s.cfg))
    records, stats = run_items(dialogues, lambda d: d.dialogue_id, mrg_predictor(s.model, s.encoder, options),
                               s.output_dir / "predictions.jsonl", batch_size=s.batch_size, dist=s.dist,
                               fingerprint=s.fingerprint)
    if not s.dist.is_main:
        return 0
    with caption_scorer(args) as scorer:
        result = evaluate_mrg(records, scorer, iou_threshold=args.iou_threshold)
    result.update({"history": args.history, "history_tokens": args.history_tokens,
                   "num_records_skipped": policy.skipped})
    write_summary_json(s.output_dir / "summary.json", {"benchmark": "cb_mrg", "data": path,
                                                       **run_fields(args, stats), **result})
    rows = {}
    g, r = result["grounding"], result["referring"]
    for rnd in sorted({*(g["by_round"] if g else {}), *((r or {}).get("by_round") or {})}, key=int):
        row = {}
        if g and rnd in g["by_round"]:
            gr = g["by_round"][rnd]
            row.update({"vg_rounds": gr["num_samples"], "success_rate": gr["success_rate"], "miou": gr["miou"]})
        if r and rnd in (r.get("by_round") or {}):
            rr = r["by_round"][rnd]
            row.update({"ref_rounds": rr["num_samples"], "METEOR": rr.get("METEOR"), "CIDEr": rr["CIDEr"]})
        rows[f"round {rnd}"] = row
    if rows:
        overall = {}
        if g:
            overall.update({"vg_rounds": g["num_samples"], "success_rate": g["success_rate"], "miou": g["miou"]})
        if r and "CIDEr" in r:
            overall.update({"ref_rounds": r["num_samples"], "METEOR": r.get("METEOR"), "CIDEr": r["CIDEr"]})
        rows = {"all": overall, **rows}
        write_markdown_report(s.output_dir / "summary.md", f"CB-MRG ({args.history} history)", rows,
                              ["vg_rounds", "success_rate", "miou", "ref_rounds", "METEOR", "CIDEr"],
                              notes=[f"data: {path}", f"rounds not run (context full): {result['num_rounds_not_run']}"])
    grounding_rounds = mrg_grounding_records(records) if args.visualize else []
    if grounding_rounds:  # the [VG] rounds, IoUs as in the summary
        from chatterbox.eval.grounding_metrics import evaluate_grounding

        ious = evaluate_grounding(grounding_rounds, iou_threshold=args.iou_threshold).ious.tolist()
        write_visualizations(grounding_rounds, ious, s.output_dir, args.visualize)
    print_outcome(s.output_dir / "predictions.jsonl", len(records), stats, result, unit="dialogues")
    return 0


if __name__ == "__main__":
    entry_point(main)
