"""CB-MRG multi-round evaluation: run each dialogue's rounds in order, score every round, by round index.

Protocol (also in evaluation/README.md, "CB-MRG"): rounds come from `questions.build_mrg_dialogue`.
Round k's prompt is the dialogue so far plus round k's user text (``<bbox>`` regions / ``[VG]`` as the
round allows). The earlier assistant turns are the model's own answers (``history="model"``, default)
or the ground-truth answers (``history="ground_truth"``). Earlier user turns are given as plain text
(``history_tokens="plain"``, the form of the training data's context rounds) or with their ``<bbox>``
regions and ``[VG]`` kept (``"keep"``, as a chat session would). Rounds of a batch of dialogues run
together, one batched generation per round index.

Scores: ``[VG]`` rounds -> IoU of the box answering this round's ``[VG]`` with the answer's box
(success = IoU >= 0.5, mIoU, mIoU@success; also for the rounds after the first, and the target-swap
control, see `evaluate_mrg`); rounds with a region input -> BLEU/METEOR/ROUGE-L/CIDEr
of the answer against the ground-truth answer; both overall and per round index. A round that could
not run (its prompt would exceed the context) stays in every denominator: IoU 0 / empty answer,
and is counted (``num_rounds_not_run``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from chatterbox.conversation import ASSISTANT, USER, Message
from chatterbox.eval.grounding_metrics import GroundingRecord, iou_per_item, summarize_ious, summarize_ious_by_group
from chatterbox.eval.questions import MrgDialogue
from chatterbox.eval.runner import EVAL_IMAGE_PREFIX, GenerationRequest, RequestEncoder, generate_for_requests
from chatterbox.tokens import VG_TOKEN

__all__ = ["MrgRunOptions", "mrg_predictor", "evaluate_mrg", "mrg_grounding_records", "EMPTY_ANSWER_IN_HISTORY"]

HISTORY_MODES = ("model", "ground_truth")
HISTORY_TOKEN_MODES = ("plain", "keep")
#: what an earlier round's empty model answer becomes in the history (a turn cannot be empty); CB-MRG's
#: own phrase for an unknown answer.
EMPTY_ANSWER_IN_HISTORY = "I do not know."


@dataclass(frozen=True)
class MrgRunOptions:
    history: str = "model"
    history_tokens: str = "plain"
    max_new_tokens: int = 512
    box_threshold: float | None = None
    image_prefix: str = EVAL_IMAGE_PREFIX

    def __post_init__(self):
        if self.history not in HISTORY_MODES:
            raise ValueError(f"history must be one of {HISTORY_MODES}, got {self.history!r}")
        if self.history_tokens not in HISTORY_TOKEN_MODES:
            raise ValueError(f"history_tokens must be one of {HISTORY_TOKEN_MODES}, got {self.history_tokens!r}")


def _history_answer(text: str) -> str:
    # A [VG] the model generated has no box to go with it in a later prompt; the text stays.
    cleaned = " ".join(text.replace(VG_TOKEN, " ").split())
    return cleaned or EMPTY_ANSWER_IN_HISTORY


def mrg_predictor(model, encoder: RequestEncoder, options: MrgRunOptions) -> Callable[[list[MrgDialogue]], list[dict]]:
    """``predict_batch`` for `run_items` over dialogues: one record per dialogue with every round."""

    def predict(dialogues: list[MrgDialogue]) -> list[dict]:
        histories: list[list[Message]] = [[] for _ in dialogues]
        history_boxes: list[list] = [[] for _ in dialogues]
        stopped = [False] * len(dialogues)
        results: list[list[dict]] = [[] for _ in dialogues]
        for k in range(max(len(d.rounds) for d in dialogues)):
            batch, requests = [], []
            for j, d in enumerate(dialogues):
                if k >= len(d.rounds):
                    continue
                rnd = d.rounds[k]
                prefix = options.image_prefix if k == 0 else ""
                request = GenerationRequest(f"{d.dialogue_id}/round{rnd.index}", d.image_path,
                                            histories[j] + [Message(USER, prefix + rnd.user_text)],
                                            history_boxes[j] + list(rnd.region_boxes_xyxy_abs),
                                            image_size=d.image_size)
                if not stopped[j] and len(encoder.prompt_ids(request)) + options.max_new_tokens > encoder.max_length:
                    stopped[j] = True  # this and every later round would not fit the context
                if stopped[j]:
                    results[j].append(_round_record(rnd, None))
                    continue
                batch.append(j)
                requests.append(request)
            if not requests:
                continue
            outputs = generate_for_requests(model, encoder, requests, max_new_tokens=options.max_new_tokens,
                                            box_threshold=options.box_threshold)
            for j, out in zip(batch, outputs):
                d, rnd = dialogues[j], dialogues[j].rounds[k]
                results[j].append(_round_record(rnd, out))
                prefix = options.image_prefix if k == 0 else ""
                if options.history_tokens == "keep":
                    histories[j].append(Message(USER, prefix + rnd.user_text))
                    history_boxes[j] += list(rnd.region_boxes_xyxy_abs)
                else:
                    histories[j].append(Message(USER, prefix + rnd.plain_question))
                answer = rnd.reference_answer if options.history == "ground_truth" else _history_answer(out["text"])
                histories[j].append(Message(ASSISTANT, answer))
        return [{"image_path": d.image_path, "history": options.history, "history_tokens": options.history_tokens,
                 "rounds": results[j]} for j, d in enumerate(dialogues)]

    return predict


def _round_record(rnd, out: dict | None) -> dict:
    record = {
        "round": rnd.index, "user_text": rnd.user_text, "run": out is not None,
        "region_boxes_xyxy_abs": [list(b) for b in rnd.region_boxes_xyxy_abs],
        "target_box_xyxy_abs": list(rnd.target_box_xyxy_abs) if rnd.target_box_xyxy_abs is not None else None,
        "reference_answer": rnd.reference_answer,
        "text": out["text"] if out is not None else "",
        "box_xyxy_abs": None, "score": None,
    }
    if out is not None and rnd.is_grounding and out["vg_in_prompt"]:
        k = out["vg_in_prompt"] - 1  # this round's [VG] is the prompt's last one
        record["box_xyxy_abs"], record["score"] = out["boxes_xyxy_abs"][k], out["scores"][k]
    if out is not None:
        record["generated_boxes_xyxy_abs"] = out["boxes_xyxy_abs"][out["vg_in_prompt"]:]
    return record


def evaluate_mrg(records: list[dict], scorer=None, iou_threshold: float = 0.5) -> dict:
    """Summary of `mrg_predictor` records: grounding and referring metrics, overall and per round index.

    Grounding also reports ``later_rounds`` (the ``[VG]`` rounds after a dialogue's first round, whose
    answer may depend on what came before) and, for both, ``success_rate_target_swapped``: each round's
    box scored against the target of the next ``[VG]`` round of the same dialogue that has another
    target. A model that follows the dialogue ("Where is it?" after "What is <region>?") scores far lower
    there; one that answers every round with the same salient object scores about the same.

    ``scorer``: a `caption_metrics.CaptionScorer` (reused across calls); None skips the caption metrics.
    """
    ious, iou_rounds, missing, swapped_hits, later = [], [], [], [], []
    refs, hyps, ref_rounds = {}, {}, {}
    num_rounds = num_not_run = 0
    dialogues_with_vg = dialogues_all_success = 0
    for d, rec in enumerate(records):
        vg_success = []
        vg_rounds = [r for r in rec["rounds"] if r["target_box_xyxy_abs"] is not None]
        for r in rec["rounds"]:
            num_rounds += 1
            num_not_run += not r["run"]
            if r["region_boxes_xyxy_abs"]:
                key = f"{rec['id']}/round{r['round']}"
                refs[key] = [r["reference_answer"]]
                hyps[key] = r["text"].strip()
                ref_rounds[key] = str(r["round"])
        for k, r in enumerate(vg_rounds):
            box = r["box_xyxy_abs"]
            iou = 0.0 if box is None else float(iou_per_item([box], [r["target_box_xyxy_abs"]])[0])
            missing.append(box is None)
            ious.append(iou)
            iou_rounds.append(str(r["round"]))
            later.append(r["round"] > 1)
            vg_success.append(iou >= iou_threshold)
            partner = next((p for p in vg_rounds[k + 1:] + vg_rounds[:k]
                            if p["target_box_xyxy_abs"] != r["target_box_xyxy_abs"]), None)
            if partner is None:
                swapped_hits.append(None)
            else:
                swapped = 0.0 if box is None else float(iou_per_item([box], [partner["target_box_xyxy_abs"]])[0])
                swapped_hits.append(swapped >= iou_threshold)
        if vg_success:
            dialogues_with_vg += 1
            dialogues_all_success += all(vg_success)

    summary: dict = {"num_dialogues": len(records), "num_rounds": num_rounds, "num_rounds_not_run": num_not_run}
    if ious:
        overall = summarize_ious(ious, iou_threshold=iou_threshold, num_missing=sum(missing))
        by_round = summarize_ious_by_group(ious, iou_rounds, iou_threshold=iou_threshold, missing_mask=missing)
        summary["grounding"] = {**overall.to_dict(), **_target_swapped(swapped_hits),
                                "by_round": {k: v.to_dict() for k, v in _by_index(by_round)},
                                "later_rounds": _later_rounds(ious, missing, later, swapped_hits, iou_threshold),
                                # consistency over a dialogue: every [VG] round of it succeeded
                                "dialogue_all_success_rate": dialogues_all_success / dialogues_with_vg,
                                "num_dialogues": dialogues_with_vg}
    else:
        summary["grounding"] = None
    if refs and scorer is not None:
        referring = {**scorer.score(refs, hyps), "num_samples": len(refs)}
        by_round = {}
        for rnd in sorted(set(ref_rounds.values()), key=int):
            keys = [k for k, v in ref_rounds.items() if v == rnd]
            by_round[rnd] = {**scorer.score({k: refs[k] for k in keys}, {k: hyps[k] for k in keys}),
                             "num_samples": len(keys)}
        referring["by_round"] = by_round
        summary["referring"] = referring
    else:
        summary["referring"] = None if not refs else {"num_samples": len(refs), "skipped": "no caption scorer"}
    return summary


def _target_swapped(hits: list) -> dict:
    scored = [h for h in hits if h is not None]
    return {"success_rate_target_swapped": sum(scored) / len(scored) if scored else None,
            "num_target_swappable": len(scored)}


def _later_rounds(ious, missing, later, swapped_hits, iou_threshold) -> dict | None:
    idx = [i for i, is_later in enumerate(later) if is_later]
    if not idx:
        return None
    summary = summarize_ious([ious[i] for i in idx], iou_threshold=iou_threshold,
                             num_missing=sum(missing[i] for i in idx))
    return {**summary.to_dict(), **_target_swapped([swapped_hits[i] for i in idx])}


def mrg_grounding_records(records: list[dict]) -> list[GroundingRecord]:
    """The ``[VG]`` rounds of `mrg_predictor` records as `GroundingRecord`s (for visualisation), in
    dialogue then round order: ``index`` counts them, ``group`` is the round index, ``prompt`` names the
    dialogue and round; a round without a predicted box has ``pred_box_xyxy_abs`` None (IoU 0)."""
    out = []
    for rec in records:
        for r in rec["rounds"]:
            if r["target_box_xyxy_abs"] is None:
                continue
            out.append(GroundingRecord(
                index=len(out), gt_box_xyxy_abs=tuple(r["target_box_xyxy_abs"]),
                pred_box_xyxy_abs=tuple(r["box_xyxy_abs"]) if r["box_xyxy_abs"] is not None else None,
                score=r["score"], image_path=rec["image_path"],
                prompt=f"{rec['id']} round {r['round']}: {r['user_text']}", group=str(r["round"])))
    return out


def _by_index(groups: dict):
    return sorted(groups.items(), key=lambda kv: int(kv[0]))
