"""Evaluation: metrics that reproduce upstream's published numbers, cleaning, reports.

Modules (import the one you need; this package imports nothing heavy on its own):

* ``grounding_metrics`` - IoU, mIoU, success rate, mIoU@success, REC Acc@0.5, upstream prediction.json reader.
* ``caption_metrics``   - BLEU-1..4 / METEOR / ROUGE-L / CIDEr via pycocoevalcap (refer-toolkit procedure),
  optional BERTScore, readers for upstream's referring output files.
* ``cleaning``          - upstream's process.py / process_clean.py post-processing of referring answers.
* ``reports``           - summary JSON, markdown tables, PNG visualisation of grounding predictions.
* ``questions``         - question sets built from raw annotations as upstream builds them (COCO grounding,
  RefCOCOg referring, RefCOCO/+/g REC) and CB-MRG evaluation dialogues.
* ``runner``            - batched generation, resumable JSONL predictions, torchrun sharding.
* ``benchmarks``        - single-round prediction records -> upstream's file formats -> metrics.
* ``mrg``               - CB-MRG multi-round evaluation (per-round grounding and referring scores).
"""
