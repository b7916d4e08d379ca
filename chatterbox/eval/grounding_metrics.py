"""Grounding metrics (one box per question) and the reader for upstream's ``prediction.json``.

Metric conventions, pinned against upstream's ``evaluate_coco_gd.py`` (spec/evaluation_reference.md §3):

* IoU without the +1 pixel convention, on pixel xyxy boxes; the ground truth is COCO xywh (floats,
  not rounded) turned into xyxy as ``[x, y, x + w, y + h]``.
* mIoU = mean IoU over **all** questions; success = IoU >= threshold (0.5); success rate = successes /
  all questions; mIoU@success = mean IoU over the successful questions.
* REC Acc@0.5 (RefCOCO/+/g) is the success rate of one box per referring expression, per split.

A question the model answered with no box is either an error (default) or, with ``missing="zero"``,
counted with IoU 0 and kept in every denominator; the denominator never shrinks silently.
Everything here works on plain sequences of IoUs too, so a multi-round evaluator can summarise each
round (or any grouping) with :func:`summarize_ious` / :func:`summarize_ious_by_group`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from chatterbox.boxes import elementwise_iou, xywh_to_xyxy

__all__ = [
    "MISSING_POLICIES",
    "DEFAULT_IOU_THRESHOLD",
    "GroundingInputError",
    "GroundingSummary",
    "GroundingRecord",
    "GroundingPredictions",
    "GroundingEvaluation",
    "iou_per_item",
    "summarize_ious",
    "summarize_ious_by_group",
    "rec_accuracy",
    "rec_accuracy_per_split",
    "read_upstream_grounding_predictions",
    "read_grounding_questions",
    "evaluate_grounding",
    "query_swap_partners",
    "evaluate_query_swap",
    "evaluate_shared_words",
]

MISSING_POLICIES = ("error", "zero")
DEFAULT_IOU_THRESHOLD = 0.5
# Upstream writes this box with score 0 when no query passes its 0.3 score threshold
# (eval_grounding.py); it is a real (wrong) answer and scores IoU ~0, we only count it.
UPSTREAM_FALLBACK_BOX_XYXY = (0, 0, 1, 1)


class GroundingInputError(ValueError):
    """A predictions/questions file that cannot be evaluated as is (names file, entry and field)."""


@dataclass(frozen=True)
class GroundingSummary:
    """Aggregate grounding metrics. ``miou_at_success`` is None when nothing succeeded."""

    num_samples: int
    num_success: int
    num_missing: int
    miou: float
    success_rate: float
    miou_at_success: float | None
    iou_threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GroundingRecord:
    """One question: its ground-truth box and the predicted box (None = the model gave no box)."""

    index: int
    gt_box_xyxy_abs: tuple[float, float, float, float]
    pred_box_xyxy_abs: tuple[float, float, float, float] | None
    score: float | None = None
    image_path: str | None = None
    prompt: str | None = None
    group: str | None = None


@dataclass
class GroundingPredictions:
    """The records of one predictions file and what was noticed while reading it."""

    source: str
    records: list[GroundingRecord]
    num_missing: int = 0  # questions without a predicted box (only under missing="zero")
    num_fallback: int = 0  # upstream's "no box passed the threshold" answer [0, 0, 1, 1] / score 0


@dataclass
class GroundingEvaluation:
    summary: GroundingSummary
    ious: torch.Tensor  # float64 [num_samples], in record order (0 for missing predictions)
    groups: dict[str, GroundingSummary] = field(default_factory=dict)
    num_fallback: int = 0

    def to_dict(self) -> dict:
        out = self.summary.to_dict()
        out["num_fallback"] = self.num_fallback
        if self.groups:
            out["groups"] = {name: s.to_dict() for name, s in self.groups.items()}
        return out


# ----------------------------------------------------------------------------------------------
# Metrics on boxes / IoUs
# ----------------------------------------------------------------------------------------------


def iou_per_item(pred_boxes_xyxy_abs, gt_boxes_xyxy_abs) -> torch.Tensor:
    """IoU of matching rows, in float64 (upstream used float32; the difference is ~1e-6)."""
    pred = torch.as_tensor(pred_boxes_xyxy_abs, dtype=torch.float64).reshape(-1, 4)
    gt = torch.as_tensor(gt_boxes_xyxy_abs, dtype=torch.float64).reshape(-1, 4)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred.shape[0]} predicted boxes but {gt.shape[0]} ground-truth boxes")
    return elementwise_iou(pred, gt)


def _as_iou_tensor(ious) -> torch.Tensor:
    t = torch.as_tensor(ious, dtype=torch.float64).reshape(-1)
    bad = ~torch.isfinite(t) | (t < 0) | (t > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"IoU[{i}]={float(t[i])!r} is not a number in [0, 1]")
    return t


def summarize_ious(
    ious: Sequence[float] | torch.Tensor,
    *,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    num_missing: int = 0,
) -> GroundingSummary:
    """mIoU / success rate / mIoU@success over every item given (missing ones must be in as 0)."""
    t = _as_iou_tensor(ious)
    if t.numel() == 0:
        raise ValueError("no items to evaluate")
    success = t >= iou_threshold
    num_success = int(success.sum())
    return GroundingSummary(
        num_samples=t.numel(),
        num_success=num_success,
        num_missing=num_missing,
        miou=float(t.mean()),
        success_rate=num_success / t.numel(),
        miou_at_success=float(t[success].mean()) if num_success else None,
        iou_threshold=iou_threshold,
    )


def summarize_ious_by_group(
    ious: Sequence[float] | torch.Tensor,
    groups: Sequence[str],
    *,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    missing_mask: Sequence[bool] | None = None,
) -> dict[str, GroundingSummary]:
    """One summary per group label (e.g. split, round index), in order of first appearance."""
    t = _as_iou_tensor(ious)
    if len(groups) != t.numel():
        raise ValueError(f"{len(groups)} group labels for {t.numel()} IoUs")
    if missing_mask is not None and len(missing_mask) != t.numel():
        raise ValueError(f"{len(missing_mask)} missing flags for {t.numel()} IoUs")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    out = {}
    for name, idx in members.items():
        n_missing = sum(bool(missing_mask[i]) for i in idx) if missing_mask is not None else 0
        out[name] = summarize_ious(t[idx], iou_threshold=iou_threshold, num_missing=n_missing)
    return out


def rec_accuracy(pred_boxes_xyxy_abs, gt_boxes_xyxy_abs, *, iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> float:
    """Referring-expression comprehension accuracy: fraction of items with IoU >= threshold."""
    return summarize_ious(iou_per_item(pred_boxes_xyxy_abs, gt_boxes_xyxy_abs), iou_threshold=iou_threshold).success_rate


def rec_accuracy_per_split(
    boxes_by_split: Mapping[str, tuple[Sequence, Sequence]],
    *,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
) -> dict[str, dict]:
    """``{split: (pred_boxes_xyxy_abs, gt_boxes_xyxy_abs)}`` -> ``{split: {accuracy, num_correct, num_samples}}``.

    The splits are those of the benchmark (val/testA/testB for RefCOCO/RefCOCO+, val/test for RefCOCOg).
    """
    out = {}
    for split, (pred, gt) in boxes_by_split.items():
        s = summarize_ious(iou_per_item(pred, gt), iou_threshold=iou_threshold)
        out[split] = {
            "accuracy": s.success_rate,
            "num_correct": s.num_success,
            "num_samples": s.num_samples,
            "iou_threshold": iou_threshold,
        }
    return out


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _load_json_list(path: str | Path, what: str) -> list:
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise GroundingInputError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as e:
        raise GroundingInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise GroundingInputError(f"{path}: expected a JSON list of {what} entries, got {type(data).__name__}")
    return data


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _four_finite_numbers(value, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_real(v) for v in value):
        raise GroundingInputError(f"{where}: expected 4 numbers, got {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise GroundingInputError(f"{where}: not finite: {value!r}")
    return tuple(float(v) for v in value)


def _gt_xywh_to_xyxy(value, where: str) -> tuple[float, float, float, float]:
    x, y, w, h = _four_finite_numbers(value, where)
    if w < 0 or h < 0:
        raise GroundingInputError(f"{where}: negative width/height in xywh box {value!r}")
    return tuple(xywh_to_xyxy(torch.tensor([x, y, w, h], dtype=torch.float64)).tolist())


def _pred_xyxy(value, where: str) -> tuple[float, float, float, float]:
    # Upstream's evaluator reshapes out_boxes to [-1, 4]; a single box wrapped in a list is accepted,
    # several boxes are not (one answer per question).
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]
    x1, y1, x2, y2 = _four_finite_numbers(value, where)
    # Zero size is allowed (int truncation of a tiny box); inverted corners are not.
    if x2 < x1 or y2 < y1:
        raise GroundingInputError(f"{where}: xyxy box with x2 < x1 or y2 < y1: {value!r}")
    return (x1, y1, x2, y2)


def _score(entry: dict, where: str) -> float | None:
    if "score" not in entry or entry["score"] is None:
        return None
    s = entry["score"]
    if not _is_real(s) or not math.isfinite(s):
        raise GroundingInputError(f"{where}.score: expected a finite number, got {s!r}")
    return float(s)


def read_grounding_questions(path: str | Path) -> list[dict]:
    """Upstream's ``grounding_qa.json`` (question list): ``[{question, gt_box xywh, filename, ...}]``.

    Returns ``[{"gt_box_xyxy_abs", "question", "filename"}]`` in file order (its order is the id).
    """
    entries = _load_json_list(path, "question")
    out = []
    for i, e in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(e, dict):
            raise GroundingInputError(f"{where}: expected an object, got {type(e).__name__}")
        if "gt_box" not in e:
            raise GroundingInputError(f"{where}: missing field 'gt_box'")
        out.append(
            {
                "gt_box_xyxy_abs": _gt_xywh_to_xyxy(e["gt_box"], f"{where}.gt_box"),
                "question": e.get("question"),
                "filename": e.get("filename"),
            }
        )
    return out


def read_upstream_grounding_predictions(
    path: str | Path,
    *,
    missing: str = "error",
    questions_path: str | Path | None = None,
    group_field: str | None = None,
) -> GroundingPredictions:
    """Read upstream's ``prediction.json``: ``[{gt (xywh), out_boxes (xyxy), score, prompt, image_abs_path, ...}]``.

    ``missing``: what to do with an entry without a box (``out_boxes`` absent, null or empty) and,
    with ``questions_path``, with questions past the end of the predictions: "error" raises,
    "zero" counts it as a miss with IoU 0 (still in the denominator).
    ``questions_path``: upstream's ``grounding_qa.json``; entries are matched by position (the only
    id upstream has), the ground truth comes from it, and each prediction must agree with its
    question (same gt box, prompt = question + " [VG]"); more predictions than questions is an error.
    ``group_field``: an entry field (e.g. "split") whose value labels the entry for per-group summaries.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}; expected one of {MISSING_POLICIES}")
    entries = _load_json_list(path, "prediction")
    questions = read_grounding_questions(questions_path) if questions_path is not None else None
    if questions is not None and len(entries) > len(questions):
        raise GroundingInputError(
            f"{path}: {len(entries)} predictions but only {len(questions)} questions in {questions_path} "
            f"(entries {len(questions)}..{len(entries) - 1} are extra)"
        )
    if not entries and not questions:
        raise GroundingInputError(f"{path}: no predictions")

    result = GroundingPredictions(source=str(path), records=[])
    for i, e in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(e, dict):
            raise GroundingInputError(f"{where}: expected an object, got {type(e).__name__}")
        if questions is not None:
            q = questions[i]
            gt_xyxy = q["gt_box_xyxy_abs"]
            if "gt" in e:
                own = _gt_xywh_to_xyxy(e["gt"], f"{where}.gt")
                if max(abs(a - b) for a, b in zip(own, gt_xyxy)) > 1e-6:
                    raise GroundingInputError(
                        f"{where}.gt={e['gt']!r} differs from question {i}'s gt_box in {questions_path}: "
                        "the files are not aligned"
                    )
            prompt = e.get("prompt")
            if q["question"] is not None and isinstance(prompt, str) and prompt != q["question"] + " [VG]":
                raise GroundingInputError(
                    f"{where}.prompt={prompt!r} does not match question {i} ({q['question']!r}) in {questions_path}"
                )
        else:
            if "gt" not in e:
                raise GroundingInputError(f"{where}: missing field 'gt' (or pass the questions file)")
            gt_xyxy = _gt_xywh_to_xyxy(e["gt"], f"{where}.gt")

        raw_box = e.get("out_boxes")
        if raw_box is None or (isinstance(raw_box, (list, tuple)) and len(raw_box) == 0):
            if missing == "error":
                raise GroundingInputError(
                    f"{where}: no predicted box (field 'out_boxes' is absent/empty); "
                    "use the 'zero' missing policy to count it as IoU 0"
                )
            pred_xyxy = None
            result.num_missing += 1
        else:
            pred_xyxy = _pred_xyxy(raw_box, f"{where}.out_boxes")
        score = _score(e, where)
        if pred_xyxy == tuple(map(float, UPSTREAM_FALLBACK_BOX_XYXY)) and score == 0:
            result.num_fallback += 1

        group = None
        if group_field is not None:
            if group_field not in e:
                raise GroundingInputError(f"{where}: missing group field {group_field!r}")
            group = str(e[group_field])
        result.records.append(
            GroundingRecord(
                index=i,
                gt_box_xyxy_abs=gt_xyxy,
                pred_box_xyxy_abs=pred_xyxy,
                score=score,
                image_path=e.get("image_abs_path"),
                prompt=e.get("prompt"),
                group=group,
            )
        )

    if questions is not None and len(entries) < len(questions):
        first, last = len(entries), len(questions) - 1
        if missing == "error":
            raise GroundingInputError(
                f"{path}: {len(entries)} predictions for {len(questions)} questions in {questions_path}; "
                f"questions {first}..{last} have no prediction (use the 'zero' missing policy to count them as IoU 0)"
            )
        if group_field is not None:
            raise GroundingInputError(f"{path}: questions {first}..{last} have no prediction, so no {group_field!r}")
        for i in range(first, last + 1):
            q = questions[i]
            result.records.append(
                GroundingRecord(index=i, gt_box_xyxy_abs=q["gt_box_xyxy_abs"], pred_box_xyxy_abs=None,
                                prompt=(q["question"] + " [VG]") if q["question"] else None)
            )
            result.num_missing += 1
    return result


def evaluate_grounding(
    predictions: GroundingPredictions | Iterable[GroundingRecord],
    *,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
) -> GroundingEvaluation:
    """IoU per record (0 where the box is missing) and the summaries, overall and per group."""
    if isinstance(predictions, GroundingPredictions):
        records, num_fallback = predictions.records, predictions.num_fallback
    else:
        records, num_fallback = list(predictions), 0
    if not records:
        raise ValueError("no records to evaluate")
    missing_mask = [r.pred_box_xyxy_abs is None for r in records]
    pred = torch.tensor(
        [r.pred_box_xyxy_abs if r.pred_box_xyxy_abs is not None else (0.0, 0.0, 0.0, 0.0) for r in records],
        dtype=torch.float64,
    )
    gt = torch.tensor([r.gt_box_xyxy_abs for r in records], dtype=torch.float64)
    ious = iou_per_item(pred, gt)
    ious = torch.where(torch.tensor(missing_mask), torch.zeros_like(ious), ious)
    summary = summarize_ious(ious, iou_threshold=iou_threshold, num_missing=sum(missing_mask))
    groups = {}
    if any(r.group is not None for r in records):
        labels = [r.group if r.group is not None else "" for r in records]
        groups = summarize_ious_by_group(ious, labels, iou_threshold=iou_threshold, missing_mask=missing_mask)
    return GroundingEvaluation(summary=summary, ious=ious, groups=groups, num_fallback=num_fallback)


# ----------------------------------------------------------------------------------------------
# Query-swap control: does the box follow the words?
# ----------------------------------------------------------------------------------------------


def query_swap_partners(records: Sequence[GroundingRecord]) -> list[int | None]:
    """For each record, the index (in ``records``) of the next record about the same image whose prompt
    differs (cyclically, in record order); None when the image has no other question."""
    by_image: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.image_path is None or r.prompt is None:
            raise ValueError(f"record {r.index} has no image path or prompt: the query-swap control needs both")
        by_image.setdefault(r.image_path, []).append(i)
    partners: list[int | None] = [None] * len(records)
    for members in by_image.values():
        for k, i in enumerate(members):
            for step in range(1, len(members)):
                j = members[(k + step) % len(members)]
                if records[j].prompt != records[i].prompt:
                    partners[i] = j
                    break
    return partners


def evaluate_query_swap(records: Sequence[GroundingRecord], *,
                        iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> dict:
    """Success rate when each question's ``[VG]`` query is replaced by that of another question about the
    same image (`query_swap_partners`), the image unchanged.

    The box depends only on the image and the query, so the swapped answer to question i *is* the
    prediction of its partner j: it is scored against i's ground truth, no model run needed. A model that
    grounds the words scores far lower here than unswapped; one that returns the same box whatever the
    question asks scores the same. Both rates are over the questions that have a partner.
    """
    partners = query_swap_partners(records)
    pairs = [(i, j) for i, j in enumerate(partners) if j is not None]
    if not pairs:
        return {"num_swappable": 0, "success_rate": None, "success_rate_query_swapped": None}
    zero = (0.0, 0.0, 0.0, 0.0)

    def box(r):
        return r.pred_box_xyxy_abs if r.pred_box_xyxy_abs is not None else zero

    gt = [records[i].gt_box_xyxy_abs for i, _ in pairs]
    own = iou_per_item([box(records[i]) for i, _ in pairs], gt)
    swapped = iou_per_item([box(records[j]) for _, j in pairs], gt)
    return {"num_swappable": len(pairs),
            "success_rate": float((own >= iou_threshold).double().mean()),
            "success_rate_query_swapped": float((swapped >= iou_threshold).double().mean())}


def evaluate_shared_words(records: Sequence[GroundingRecord], names: Sequence[str], *,
                          iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> list[dict]:
    """Which words of a name the box follows: for each word position k of the (space-separated) names,
    the success rate over the questions whose image also holds another asked-about name sharing word k,
    where only the other words tell the shapes apart ("red circle" beside a "blue circle": the colour
    decides). ``names[r.index]`` is the name record r asks about.

    Beside it, ``chance``: the mean of 1 / (1 + the number of such names in the image), what a model that
    reads every word but k, and picks among the shapes sharing word k at random, would score. One dict per
    word position that some question has, in order: ``word``, ``num_questions``, ``success_rate``, ``chance``.
    """
    if len(names) < max((r.index for r in records), default=-1) + 1:
        raise ValueError(f"{len(names)} names for records up to index {max(r.index for r in records)}")
    by_image: dict[str, set[str]] = {}
    for r in records:
        if r.image_path is None:
            raise ValueError(f"record {r.index} has no image path: the shared-word breakdown needs it")
        by_image.setdefault(r.image_path, set()).add(names[r.index])
    zero = (0.0, 0.0, 0.0, 0.0)
    ious = iou_per_item([r.pred_box_xyxy_abs if r.pred_box_xyxy_abs is not None else zero for r in records],
                        [r.gt_box_xyxy_abs for r in records])
    results = []
    for word in range(max(len(n.split()) for n in names)):
        hits, chances = [], []
        for r, iou in zip(records, ious.tolist()):
            words = names[r.index].split()
            if word >= len(words):
                continue
            sharing = sum(1 for other in by_image[r.image_path] if other != names[r.index]
                          and len(other.split()) > word and other.split()[word] == words[word])
            if sharing:
                hits.append(iou >= iou_threshold)
                chances.append(1.0 / (1 + sharing))
        if hits:
            results.append({"word": word, "num_questions": len(hits), "success_rate": sum(hits) / len(hits),
                            "chance": sum(chances) / len(chances)})
    return results
