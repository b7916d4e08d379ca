"""RefCOCOg (umd) referring / region captioning with a model, upstream's protocol (spec §4.2).

    python evaluation/refcocog_referring.py --config CONFIG [--checkpoint EXPORT_DIR] [--data REFER_DIR]
        [--split test|val] [--image-dir COCO2014_TRAIN_DIR] [--clean] [--no-meteor] [--output-dir DIR]
    torchrun --nproc_per_node 8 evaluation/refcocog_referring.py ...

Questions from <data>/refcocog/refs(umd).p + instances.json, as upstream's
refcocog_referring_conversation.py (written to <output-dir>/<split>.json). The model sees
"<image> What is it <bbox>?" + eval.referring_suffix ("Please give a brief answer in one sentence
less than 10 words.", no space); the answer is the text after "ASSISTANT:". Writes predictions.jsonl
(resumable), upstream's raw_output file refcocog_<split>.json, summary.json/.md; the last line printed
is the metrics JSON (Bleu_1..4, METEOR, ROUGE_L, CIDEr unrounded), the same as eval_referring.py on
the written raw_output file.
"""
from __future__ import annotations

import os

from chatterbox.data.errors import DataError
from chatterbox.eval.cli import (add_meteor_argument, entry_point, print_outcome, run_fields, run_single_round,
                                 runner_parser, write_upstream_json)


def parse_args(argv=None):
    p = runner_parser(__doc__)
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--split-by", default="umd")
    p.add_argument("--image-dir", default="", help="default: <data.paths.coco2014_dir>/train2014")
    p.add_argument("--clean", action="store_true", help="score upstream's cleaned answers (process_clean.py)")
    add_meteor_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from chatterbox.eval import questions as Q
    from chatterbox.eval.benchmarks import referring_raw_output
    from chatterbox.eval.caption_metrics import CaptionScorer, refer_reference
    from chatterbox.eval.cleaning import clean_caption_upstream
    from chatterbox.eval.reports import write_markdown_report, write_summary_json
    from chatterbox.eval.runner import setup_runner

    args = parse_args(argv)
    s = setup_runner(args, f"refcocog_referring_{args.split}")
    refer_dir = args.data or s.cfg.data.paths.refer_dir
    folder = os.path.join(refer_dir, "refcocog")
    by_split = Q.refcocog_referring_questions(os.path.join(folder, f"refs({args.split_by}).p"),
                                              os.path.join(folder, "instances.json"))
    records = by_split.get(args.split, [])
    if not records:
        raise DataError(f"no refs of split {args.split!r} (splits present: {sorted(by_split)})", folder, None, "split")
    if s.dist.is_main:
        write_upstream_json(s.output_dir / f"{args.split}.json", records)
    image_dir = args.image_dir or os.path.join(s.cfg.data.paths.coco2014_dir, "train2014")
    items = Q.referring_items(records, image_dir, s.cfg.eval.referring_suffix, source=f"refcocog_{args.split}.json")
    items, records_out, stats = run_single_round(s, items, limit=args.limit, box_threshold=None)
    if not s.dist.is_main:
        return 0
    raw = referring_raw_output(items, records_out)
    write_upstream_json(s.output_dir / f"refcocog_{args.split}.json", raw)
    clean = args.clean or s.cfg.eval.clean_referring_output
    refs = {str(e["ref_id"]): [refer_reference(g) for g in e["gt"]] for e in raw}
    hyps = {str(e["ref_id"]): clean_caption_upstream(e["text_output"]) if clean else e["text_output"] for e in raw}
    with CaptionScorer(with_meteor=not args.no_meteor) as scorer:
        result = scorer.score(refs, hyps)
    result.update({"num_refs": len(refs), "clean": clean})
    write_summary_json(s.output_dir / "summary.json", {"benchmark": "refcocog_referring", "split": args.split,
                                                        **run_fields(args, stats), **result})
    write_markdown_report(s.output_dir / "summary.md", f"RefCOCOg {args.split} referring",
                          {f"{args.split}{' (clean)' if clean else ''}": result},
                          [k for k in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "num_refs") if k in result])
    print_outcome(s.output_dir / f"refcocog_{args.split}.json", len(raw), stats, result)
    return 0


if __name__ == "__main__":
    entry_point(main)
