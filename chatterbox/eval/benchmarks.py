"""Single-round benchmarks on top of the runner: prediction records, upstream's file formats, metrics.

* grounding (COCO val2017, RefCOCO/+/g REC): the box answering the prompt's ``[VG]`` ->
  upstream's ``prediction.json`` entries (``out_boxes`` = xyxy pixels truncated to int, as upstream) ->
  mIoU / success rate / mIoU@success (and Acc@0.5 per split), computed on exactly those entries, so
  ``evaluation/eval_grounding.py`` on the written file prints the same numbers.
* referring (RefCOCOg): the answer text -> upstream's ``raw_output`` entries (``text_output``) ->
  BLEU/METEOR/ROUGE-L/CIDEr with the refer-toolkit procedure (optionally on upstream-cleaned answers),
  and the name accuracy: does the answer name the pointed object's category?
"""
from __future__ import annotations

import re
from typing import Sequence

from chatterbox.eval.grounding_metrics import (GroundingEvaluation, GroundingPredictions, evaluate_grounding,
                                               read_upstream_grounding_predictions)
from chatterbox.eval.questions import EvalItem
from chatterbox.eval.runner import (EVAL_IMAGE_PREFIX, GenerationRequest, ImagePrefetcher, RequestEncoder,
                                     generate_for_requests)

__all__ = ["SingleRoundPredictor", "grounding_prediction_entries", "read_grounding_file", "evaluate_grounding_file",
           "referring_raw_output", "names_object", "referring_name_accuracy", "colour_kind_accuracy_fields"]


class SingleRoundPredictor:
    """``predict_batch`` for `run_items`: one generation per item (replies of at least ``min_new_tokens``);
    `prefetch` prepares the next batch's images in worker threads (`ImagePrefetcher`).

    Record: ``task, prompt, text, box_xyxy_abs, score`` (the box of the prompt's last ``[VG]``, None
    without one) plus every box (``boxes_xyxy_abs``, ``scores``, ``vg_in_prompt``) for inspection.
    """

    def __init__(self, model, encoder: RequestEncoder, *, max_new_tokens: int, box_threshold: float | None,
                 image_prefix: str = EVAL_IMAGE_PREFIX, min_new_tokens: int = 0):
        self.model, self.encoder, self.image_prefix = model, encoder, image_prefix
        self.max_new_tokens, self.min_new_tokens, self.box_threshold = max_new_tokens, min_new_tokens, box_threshold
        self.images = ImagePrefetcher(encoder)

    def requests(self, items: list[EvalItem]) -> list[GenerationRequest]:
        return [GenerationRequest.single_turn(it.item_id, it.image_path, it.user_text, it.region_boxes_xyxy_abs,
                                              it.image_size, self.image_prefix) for it in items]

    def prefetch(self, items: list[EvalItem]) -> None:
        self.images.submit(self.requests(items))

    def __call__(self, items: list[EvalItem]) -> list[dict]:
        requests = self.requests(items)
        outputs = generate_for_requests(self.model, self.encoder, requests, max_new_tokens=self.max_new_tokens,
                                        min_new_tokens=self.min_new_tokens, box_threshold=self.box_threshold,
                                        images=self.images.take(requests))
        records = []
        for it, out in zip(items, outputs):
            k = out["vg_in_prompt"]
            records.append({
                "task": it.task, "prompt": it.user_text, "text": out["text"],
                "box_xyxy_abs": out["boxes_xyxy_abs"][k - 1] if k else None,
                "score": out["scores"][k - 1] if k else None,
                "boxes_xyxy_abs": out["boxes_xyxy_abs"], "scores": out["scores"], "vg_in_prompt": k,
                "num_generated_tokens": len(out["token_ids"]),
            })
        return records


def _xywh_of(box_xyxy_abs) -> list[float]:
    x1, y1, x2, y2 = box_xyxy_abs
    return [x1, y1, x2 - x1, y2 - y1]


def grounding_prediction_entries(items: Sequence[EvalItem], records: Sequence[dict],
                                 group_field: str | None = None) -> list[dict]:
    """Upstream's ``prediction.json`` entries: ``{gt (xywh), out_category, image_abs_path, prompt, score,
    out_boxes (int xyxy)}``; an entry without a box (no ``[VG]`` answered) has no ``out_boxes``, which
    the metrics count as a miss only under their explicit "zero" policy. ``group_field`` adds e.g. "split"."""
    if len(items) != len(records):
        raise ValueError(f"{len(items)} items but {len(records)} prediction records")
    entries = []
    for it, rec in zip(items, records):
        if rec["id"] != it.item_id:
            raise ValueError(f"prediction record {rec['id']!r} does not line up with item {it.item_id!r}")
        gt = it.upstream.get("gt_box") or _xywh_of(it.gt_boxes_xyxy_abs[0])
        entry = {"gt": gt, "out_category": it.upstream.get("catgory", it.upstream.get("sentence")),
                 "image_abs_path": it.image_path, "prompt": rec["prompt"], "score": rec["score"]}
        if rec["box_xyxy_abs"] is not None:
            entry["out_boxes"] = [int(v) for v in rec["box_xyxy_abs"]]  # upstream truncates to int pixels
        if group_field is not None:
            entry[group_field] = it.group
        entries.append(entry)
    return entries


def read_grounding_file(path, *, group_field: str | None = None, questions_path=None) -> GroundingPredictions:
    """A written prediction.json, read by the same reader as evaluation/eval_grounding.py (so both print
    the same numbers); an entry without a box counts as IoU 0 and is counted."""
    return read_upstream_grounding_predictions(path, missing="zero", questions_path=questions_path,
                                               group_field=group_field)


def evaluate_grounding_file(path, *, iou_threshold: float = 0.5, group_field: str | None = None,
                            questions_path=None) -> GroundingEvaluation:
    """The metrics of a written prediction.json (see `read_grounding_file`)."""
    predictions = read_grounding_file(path, group_field=group_field, questions_path=questions_path)
    return evaluate_grounding(predictions, iou_threshold=iou_threshold)


def referring_raw_output(items: Sequence[EvalItem], records: Sequence[dict]) -> list[dict]:
    """Upstream's ``raw_output/refcocog_<split>.json`` entries: ``{gt, ref_id, id (image id),
    image_abs_path, input_bbox, prompt, text_output}``."""
    if len(items) != len(records):
        raise ValueError(f"{len(items)} items but {len(records)} prediction records")
    out = []
    for it, rec in zip(items, records):
        if rec["id"] != it.item_id:
            raise ValueError(f"prediction record {rec['id']!r} does not line up with item {it.item_id!r}")
        out.append({"gt": it.references, "ref_id": it.upstream["ref_id"], "id": it.upstream["image_id"],
                    "image_abs_path": it.image_path,
                    "input_bbox": [[int(v) for v in b] for b in it.region_boxes_xyxy_abs],
                    "prompt": it.upstream["prompt"], "text_output": rec["text"]})
    return out


def names_object(text: str, name: str) -> bool:
    """Whether every word of ``name`` (a category such as "red circle") is a whole word of ``text``,
    case-insensitive: "It is a red circle." names "red circle", "It is a reddish circle." does not."""
    words = set(re.findall(r"[a-z0-9]+", text.lower()))
    wanted = re.findall(r"[a-z0-9]+", name.lower())
    return bool(wanted) and all(w in words for w in wanted)


def referring_name_accuracy(texts: Sequence[str], names: Sequence[str | None]) -> dict:
    """Fraction of answers that name their object's category (`names_object`), over the answers whose
    object has one (``names[i]`` None: not counted, and reported as ``num_unnamed``).

    Captioning metrics reward fluent generic text; this one asks the question referring is for: does the
    answer say *what* the box points at? A model that gives every region the same answer scores at most
    the share of the most frequent category.

    ``name_word_accuracy[k]``: the same for the k-th word of the category names alone (for "red circle":
    the colour, then the kind), with ``name_word_accuracy_most_frequent[k]``, its most-frequent-word
    control; over the categories that have a k-th word."""
    if len(texts) != len(names):
        raise ValueError(f"{len(texts)} answers but {len(names)} category names")
    scored = [(t, n) for t, n in zip(texts, names) if n is not None]
    result = _accuracy_and_control(scored)
    words = [(t, n.split()) for t, n in scored]
    by_word = [_accuracy_and_control([(t, w[k]) for t, w in words if len(w) > k])
               for k in range(max((len(w) for _, w in words), default=0))]
    return {"name_accuracy": result[0], "name_accuracy_most_frequent_category": result[1],
            "name_word_accuracy": [a for a, _ in by_word], "name_word_accuracy_most_frequent": [c for _, c in by_word],
            "num_named": len(scored), "num_unnamed": len(texts) - len(scored)}


def colour_kind_accuracy_fields(accuracy: dict) -> dict:
    """`referring_name_accuracy`'s result for "<colour> <kind>" names (the synthetic shapes) as flat summary
    fields: both words, then each word on its own, every one beside its most-frequent control."""
    return {
        "referring_accuracy": accuracy["name_accuracy"],
        "referring_accuracy_most_frequent_category": accuracy["name_accuracy_most_frequent_category"],
        "referring_colour_accuracy": accuracy["name_word_accuracy"][0],
        "referring_kind_accuracy": accuracy["name_word_accuracy"][1],
        "referring_colour_accuracy_most_frequent": accuracy["name_word_accuracy_most_frequent"][0],
        "referring_kind_accuracy_most_frequent": accuracy["name_word_accuracy_most_frequent"][1],
    }


def _accuracy_and_control(scored: list[tuple[str, str]]) -> tuple[float | None, float | None]:
    """(fraction of texts naming their name, share of the most frequent name)."""
    if not scored:
        return None, None
    counts: dict[str, int] = {}
    for _, n in scored:
        counts[n] = counts.get(n, 0) + 1
    return sum(names_object(t, n) for t, n in scored) / len(scored), max(counts.values()) / len(scored)

