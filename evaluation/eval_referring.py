"""Referring (region captioning) metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ optional BERTScore).

    python evaluation/eval_referring.py --predictions FILE [FILE ...] [--references FILE]
        [--clean [on|off|both]] [--gt-procedure refer|asis] [--bertscore] [--out-dir DIR]

--predictions: upstream's raw_output file as is (predictions = ``text_output``; it also holds the
  references, ``gt``), or a ``{"predictions": [{"sent", "ref_id"}]}`` file (upstream's
  modify_output / clean_output layout) together with --references. Several files are scored in one
  process against the same references (METEOR's Java start-up is paid once).
--references: upstream's raw_output file (``gt`` per ref_id) or a ``{ref_id: [sentences]}`` object.
  Default: the first predictions file, when it is a raw_output file.
--clean: score upstream's cleaned answers (process_clean.py) instead of, or as well as ("both"), the
  answers as written.
--gt-procedure: "refer" (default) rebuilds the refer toolkit's sentences from raw_output's ``gt``
  (drop the appended ".", ascii-ignore), which reproduces the published numbers; "asis" keeps them.

Predictions and references must cover the same ref_ids (missing, extra and duplicate ids are
errors). Output: a markdown table, then one JSON line per scored variant, each with Bleu_1..Bleu_4,
METEOR, ROUGE_L, CIDEr (unrounded), num_refs, predictions, clean; the last line is the last variant
(for one file without --clean both, the only one).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatterbox.eval.caption_metrics import (
    METRIC_KEYS,
    REFERENCE_PROCEDURES,
    CaptionScorer,
    ReferringInputError,
    bertscore_availability,
    optional_bertscore,
    read_referring_predictions,
    read_referring_references,
)
from chatterbox.eval.cleaning import clean_caption_upstream

CLEAN_MODES = ("off", "on", "both")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, nargs="+", help="raw_output file(s) or {'predictions': [...]} file(s)")
    p.add_argument("--references", default=None, help="raw_output file or {ref_id: [sentences]}")
    p.add_argument("--clean", nargs="?", const="on", default="off", choices=CLEAN_MODES,
                   help="apply upstream's process_clean to the predictions ('--clean' = on; 'both' scores both)")
    p.add_argument("--gt-procedure", choices=REFERENCE_PROCEDURES, default="refer")
    p.add_argument("--bertscore", action="store_true",
                   help="also BERTScore F1, only if bert_score and its model are present locally (never downloaded)")
    p.add_argument("--out-dir", default=None, help="write summary.json, summary.md and per-item scores here")
    return p.parse_args(argv)


def _variants(mode: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[mode]


def _write_items(path: Path, references, hypotheses, per_item) -> None:
    with open(path, "w") as f:
        for rid in references:
            row = {"ref_id": rid, "prediction": hypotheses[rid], "references": references[rid]}
            row.update({m: per_item[m][rid] for m in per_item})
            f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    references_path = args.references or args.predictions[0]
    try:
        references = read_referring_references(references_path, procedure=args.gt_procedure)
        predictions = {path: read_referring_predictions(path) for path in args.predictions}
    except ReferringInputError as e:
        print(f"error: {e}" + ("" if args.references else " (the references are read from the first "
                                "predictions file unless --references is given)"), file=sys.stderr)
        return 1

    availability = bertscore_availability() if args.bertscore else None
    if availability is not None and not availability[0]:
        print(f"BERTScore unavailable: {availability[1]}")

    runs = []
    try:
        with CaptionScorer() as scorer:
            for path, sentences in predictions.items():
                for clean in _variants(args.clean):
                    hypotheses = {k: clean_caption_upstream(v) for k, v in sentences.items()} if clean else sentences
                    scores = scorer.score(references, hypotheses, per_item=bool(args.out_dir))
                    per_item = scores.pop("per_item", None)
                    run = {**scores, "num_refs": len(references), "predictions": path, "clean": clean,
                           "references": references_path, "gt_procedure": args.gt_procedure}
                    if args.bertscore:
                        run.update(optional_bertscore(references, hypotheses, availability))
                    runs.append((run, hypotheses, per_item))
    except ReferringInputError as e:
        print(f"error: {e} (predictions vs references {references_path})", file=sys.stderr)
        return 1

    columns = [*METRIC_KEYS, *(["BERTScore_F1"] if args.bertscore else []), "num_refs"]
    rows = {f"{Path(r['predictions']).name}{' (clean)' if r['clean'] else ''}": r for r, _, _ in runs}
    from chatterbox.eval.reports import markdown_table

    print(markdown_table(rows, columns, row_header="predictions"), end="")
    if args.out_dir:
        from chatterbox.eval.reports import write_markdown_report, write_summary_json

        out_dir = Path(args.out_dir)
        write_summary_json(out_dir / "summary.json", {"runs": [r for r, _, _ in runs]})
        write_markdown_report(out_dir / "summary.md", "Referring", rows, columns,
                              notes=[f"references: {references_path} (gt procedure: {args.gt_procedure})"])
        for k, (run, hypotheses, per_item) in enumerate(runs):
            _write_items(out_dir / f"items_{k}.jsonl", references, hypotheses, per_item)
        print(f"reports written to {out_dir}")
    for run, _, _ in runs:
        print(json.dumps(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
