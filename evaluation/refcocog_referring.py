"""RefCOCOg / RefCOCO / RefCOCO+ referring (region captioning) with a model, upstream's protocol (spec §4.2).

    python evaluation/refcocog_referring.py --config CONFIG [--checkpoint EXPORT_DIR] [--data REFER_DIR]
        [--dataset refcocog|refcoco|refcoco+] [--split SPLIT] [--split-by umd|unc]
        [--image-dir COCO2014_TRAIN_DIR] [--clean] [--no-meteor | --no-caption-metrics] [--bertscore]
        [--output-dir DIR]
    torchrun --nproc_per_node 8 evaluation/refcocog_referring.py ...

Questions from <data>/<dataset>/refs(<split-by>).p + instances.json, as upstream's
<dataset>_referring_conversation.py (written to <output-dir>/<split>.json):
  refcocog (umd; splits val, test) and refcoco+ (unc; val, testA, testB): "What is it <bbox>?", every
    sentence of the ref a reference;
  refcoco (unc; val, testA, testB): "What is in this region <bbox>?", ONE reference built from the
    ref's first sentence ("It is a man on left." / "It is man on left ." after a leading a/the/this/that).
The model sees "<image> " + question + eval.referring_suffix ("Please give a brief answer in one
sentence less than 10 words.", no space); the answer is the text after "ASSISTANT:". Writes
predictions.jsonl (resumable), upstream's raw_output file <dataset>_<split>.json, summary.json/.md; the
last line printed is the metrics JSON (Bleu_1..4, METEOR, ROUGE_L, CIDEr unrounded), the same as
eval_referring.py on the written raw_output file, plus name_accuracy: the fraction of answers naming the
ref's COCO category (every word of it, whole words; benchmarks.referring_name_accuracy) beside
name_accuracy_most_frequent_category, what always naming the commonest category would score. --bertscore adds BERTScore_F1 when the bert_score
package and its model are on disk (never downloaded); otherwise BERTScore_F1 is null and
bertscore_unavailable says why.
"""
from __future__ import annotations

import os

from chatterbox.data.errors import DataError
from chatterbox.eval.cli import (add_caption_metric_arguments, caption_scorer, entry_point, print_outcome, run_fields,
                                 run_single_round, runner_parser, write_upstream_json)

DATASETS = ("refcocog", "refcoco", "refcoco+")
#: the split a run scores when --split is not given
DEFAULT_SPLIT = {"refcocog": "test", "refcoco": "testA", "refcoco+": "testA"}


def parse_args(argv=None):
    p = runner_parser(__doc__)
    p.add_argument("--dataset", default="refcocog", choices=DATASETS)
    p.add_argument("--split", default="", help="refcocog: test|val (default test); refcoco/refcoco+: "
                                               "val|testA|testB (default testA)")
    p.add_argument("--split-by", default="", help="default: umd for refcocog, unc for refcoco/refcoco+")
    p.add_argument("--image-dir", default="", help="default: <data.paths.coco2014_dir>/train2014")
    p.add_argument("--clean", action="store_true", help="score upstream's cleaned answers (process_clean.py)")
    p.add_argument("--bertscore", action="store_true",
                   help="also BERTScore F1, only if bert_score and its model are present locally (never downloaded)")
    add_caption_metric_arguments(p)
    args = p.parse_args(argv)
    from chatterbox.eval.questions import REFERRING_SPLITS

    args.split = args.split or DEFAULT_SPLIT[args.dataset]
    if args.split not in REFERRING_SPLITS[args.dataset]:
        p.error(f"--split {args.split!r}: {args.dataset} has {', '.join(REFERRING_SPLITS[args.dataset])}")
    return args


def main(argv=None) -> int:
    from chatterbox.data.readers.refcoco import DEFAULT_SPLIT_BY
    from chatterbox.eval import questions as Q
    from chatterbox.data.readers.common import load_json, read_categories
    from chatterbox.eval.benchmarks import referring_name_accuracy, referring_raw_output
    from chatterbox.eval.caption_metrics import optional_bertscore, refer_reference
    from chatterbox.eval.cleaning import clean_caption_upstream
    from chatterbox.eval.reports import write_markdown_report, write_summary_json
    from chatterbox.eval.runner import setup_runner

    args = parse_args(argv)
    name = f"{args.dataset}_{args.split}"
    s = setup_runner(args, f"{args.dataset}_referring_{args.split}")
    refer_dir = args.data or s.cfg.data.paths.refer_dir
    folder = os.path.join(refer_dir, args.dataset)
    split_by = args.split_by or DEFAULT_SPLIT_BY[args.dataset]
    by_split = Q.referring_questions(os.path.join(folder, f"refs({split_by}).p"),
                                     os.path.join(folder, "instances.json"), args.dataset)
    records = by_split.get(args.split, [])
    if not records:
        raise DataError(f"no refs of split {args.split!r} (splits present: {sorted(by_split)})", folder, None, "split")
    if s.dist.is_main:
        write_upstream_json(s.output_dir / f"{args.split}.json", records)
    image_dir = args.image_dir or os.path.join(s.cfg.data.paths.coco2014_dir, "train2014")
    items = Q.referring_items(records, image_dir, s.cfg.eval.referring_suffix, source=f"{name}.json")
    items, records_out, stats = run_single_round(s, items, limit=args.limit, box_threshold=None)
    if not s.dist.is_main:
        return 0
    raw = referring_raw_output(items, records_out)
    write_upstream_json(s.output_dir / f"{name}.json", raw)
    clean = args.clean or s.cfg.eval.clean_referring_output
    refs = {str(e["ref_id"]): [refer_reference(g) for g in e["gt"]] for e in raw}
    hyps = {str(e["ref_id"]): clean_caption_upstream(e["text_output"]) if clean else e["text_output"] for e in raw}
    with caption_scorer(args) as scorer:
        result = {} if scorer is None else scorer.score(refs, hyps)
    if args.bertscore:
        # upstream's utils/bert_score.py joins raw_output's gt strings as stored (with their ".")
        result.update(optional_bertscore({str(e["ref_id"]): e["gt"] for e in raw}, hyps))
        if result["BERTScore_F1"] is None:
            print(f"BERTScore unavailable: {result['bertscore_unavailable']}")
    instances = os.path.join(folder, "instances.json")
    categories = read_categories(load_json(instances), instances, "instances.json")
    result.update(referring_name_accuracy([e["text_output"] for e in raw],
                                          [categories.get(r["category_id"]) for r in records[:len(raw)]]))
    result.update({"num_refs": len(refs), "clean": clean})
    write_summary_json(s.output_dir / "summary.json", {"benchmark": f"{args.dataset}_referring", "split": args.split,
                                                        "split_by": split_by, **run_fields(args, stats), **result})
    columns = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "BERTScore_F1", "name_accuracy", "num_refs")
    write_markdown_report(s.output_dir / "summary.md", f"{args.dataset} {args.split} referring",
                          {f"{args.split}{' (clean)' if clean else ''}": result}, [k for k in columns if k in result],
                          notes=[f"BERTScore unavailable: {result['bertscore_unavailable']}"]
                          if "bertscore_unavailable" in result else [])
    print_outcome(s.output_dir / f"{name}.json", len(raw), stats, result)
    return 0


if __name__ == "__main__":
    entry_point(main)
