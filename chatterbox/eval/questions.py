"""Question sets built from the raw annotation files, as upstream builds them (spec/upstream.md §4).

* COCO single-round grounding (`coco_grounding_qa` / `coco_grounding_items`): upstream's
  ``generate_coco_id.py`` + ``generate_grounding_qa.py`` on ``instances_val2017.json`` -> the
  3,422 records of ``grounding_qa.json``, reproduced record by record (same order, same floats).
* RefCOCOg / RefCOCO / RefCOCO+ referring (`referring_questions` / `referring_items`): upstream's
  ``{refcocog,refcoco,refcoco+}_referring_conversation.py`` on ``refs(<split_by>).p`` + ``instances.json``.
* RefCOCO / RefCOCO+ / RefCOCOg REC (`rec_items`): one grounding question per referring expression
  (upstream released no REC evaluation; this is the standard protocol: Acc@0.5 per split over sentences).
* CB-MRG dialogues (`mrg_dialogues`): multi-round referring + grounding from ``CB_MRG.json``; the
  protocol is in evaluation/README.md ("CB-MRG").

Every builder returns `EvalItem`s (or `MrgDialogue`s): the user text as the model sees it, the region
boxes behind its ``<bbox>`` tokens, the ground truth, and upstream's own record for writing upstream's
output formats. Bad input raises `chatterbox.data.errors.DataError` naming file, record and field.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.readers.cb300k import read_conversation_file
from chatterbox.data.readers.common import (display_name, load_json, load_pickle, read_categories, require,
                                            top_level_list)
from chatterbox.data.records import DialogueRecord, DialogueTurn
from chatterbox.tokens import BBOX_TOKEN, VG_TOKEN

__all__ = [
    "EvalItem", "MrgRound", "MrgDialogue", "MrgOptions",
    "coco_grounding_qa", "coco_grounding_items", "write_grounding_qa",
    "referring_questions", "referring_items", "REFERRING_PROMPT", "REFCOCO_REFERRING_PROMPT",
    "REFERRING_SPLITS", "refcoco_it_is_answer",
    "rec_items", "REC_SPLITS", "DEFAULT_REC_TEMPLATE",
    "mrg_dialogues", "build_mrg_dialogue",
]

#: upstream's RefCOCOg and RefCOCO+ question (the box list that follows "?" in its question file is the region).
REFERRING_PROMPT = f"What is it {BBOX_TOKEN}?"
#: upstream's RefCOCO question (refcoco_referring_conversation.py).
REFCOCO_REFERRING_PROMPT = f"What is in this region {BBOX_TOKEN}?"
#: evaluation splits of the referring question sets (the train split is built too, never evaluated).
REFERRING_SPLITS = {"refcocog": ("val", "test"), "refcoco": ("val", "testA", "testB"),
                    "refcoco+": ("val", "testA", "testB")}
#: REC splits per dataset (refer toolkit): RefCOCO/RefCOCO+ by UNC, RefCOCOg by UMD.
REC_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"), "refcocog": ("val", "test")}
#: the REC question; the same form our training builds from refer expressions (data/dialogues.py).
DEFAULT_REC_TEMPLATE = "Where is {expression}?"


@dataclass
class EvalItem:
    """One single-round question for the model."""

    item_id: str  # unique within a question set; "<source file>#<record>" style
    task: str  # "grounding" | "referring"
    image_path: str
    user_text: str  # the user message without the image placeholder, e.g. "Where is the dog? [VG]"
    region_boxes_xyxy_abs: list[tuple[float, float, float, float]] = field(default_factory=list)
    gt_boxes_xyxy_abs: list[tuple[float, float, float, float]] | None = None  # grounding target(s)
    references: list[str] | None = None  # referring reference sentences
    image_size: tuple[int, int] | None = None  # (width, height) when the annotation states it
    group: str | None = None  # e.g. the split (REC Acc per split)
    upstream: dict = field(default_factory=dict)  # upstream's question record (output formats)


def _finite_box(value, file: str, record, field_name: str) -> list:
    if not isinstance(value, list) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise DataError(f"expected 4 finite numbers, got {value!r:.80}", file, record, field_name)
    return value


# ----------------------------------------------------------------------------------------------
# COCO single-round grounding (spec §4.1)
# ----------------------------------------------------------------------------------------------


def coco_grounding_qa(instances_path: str) -> list[dict]:
    """Upstream's ``grounding_qa.json`` records from a COCO instances file, in upstream's order.

    Images in the file's ``images`` order; every annotation kept (crowd ones too, as upstream); an
    image is used only when no category name occurs twice in it, then one record per annotation in
    file order. ``gt_box`` is xywh after upstream's xywh -> xyxy -> xywh round trip (hence values such
    as 93.00999999999999), ``answer`` is ``"<cat:" + str(gt_box) + ">"`` and ``image_id`` a string.
    """
    data = load_json(instances_path)
    file = display_name(instances_path)
    categories = read_categories(data, instances_path, file)
    images: dict[int, dict] = {}
    for i, img in enumerate(top_level_list(data, instances_path, "images")):
        rec = f"images[{i}]"
        image_id = require(img, "id", int, file, rec)
        if image_id in images:
            raise DataError(f"duplicate image id {image_id}", file, rec, "id")
        images[image_id] = {"file_name": require(img, "file_name", str, file, rec),
                            "wh": [require(img, "width", int, file, rec), require(img, "height", int, file, rec)],
                            "anno": []}
    for j, ann in enumerate(top_level_list(data, instances_path, "annotations")):
        rec = f"annotations[{j}]"
        image_id = require(ann, "image_id", int, file, rec)
        if image_id not in images:
            raise DataError(f"unknown image id {image_id}", file, rec, "image_id")
        category_id = require(ann, "category_id", int, file, rec)
        if category_id not in categories:
            raise DataError(f"unknown category id {category_id}", file, rec, "category_id")
        x, y, w, h = _finite_box(require(ann, "bbox", list, file, rec), file, rec, "bbox")
        # Upstream stores xyxy here and subtracts back later: keep the same float operations.
        images[image_id]["anno"].append((categories[category_id], [x, y, x + w, y + h]))

    records = []
    for image_id, img in images.items():
        names = [name for name, _ in img["anno"]]
        if not names or len(set(names)) < len(names):
            continue
        for name, (x1, y1, x2, y2) in img["anno"]:
            gt_box = [x1, y1, x2 - x1, y2 - y1]
            records.append({"image_id": str(image_id), "filename": img["file_name"], "wh": img["wh"],
                            "catgory": name, "question": f"Where is the {name}?",
                            "answer": f"<{name}:{gt_box}>", "gt_box": gt_box})
    return records


def write_grounding_qa(records: list[dict], path: str) -> None:
    """Write records as upstream's file (``json.dump(indent=1)``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


def coco_grounding_items(records: list[dict], image_dir: str, source: str = "grounding_qa.json",
                         vg_separator: str = " ") -> list[EvalItem]:
    """`EvalItem`s of upstream's grounding records (as built above or read from its grounding_qa.json).

    Prompt = question + " " + "[VG]" (upstream's eval_grounding.py); the target is ``gt_box`` xywh ->
    ``[x, y, x + w, y + h]``, the metric's conversion.
    """
    items = []
    for i, r in enumerate(records):
        for key in ("question", "filename", "gt_box", "wh"):
            if key not in r:
                raise DataError("missing", source, i, key)
        x, y, w, h = _finite_box(r["gt_box"], source, i, "gt_box")
        wh = r["wh"]
        items.append(EvalItem(
            item_id=f"{source}#{i}", task="grounding", image_path=os.path.join(image_dir, r["filename"]),
            user_text=r["question"] + vg_separator + VG_TOKEN, gt_boxes_xyxy_abs=[(x, y, x + w, y + h)],
            image_size=(int(wh[0]), int(wh[1])), upstream=r,
        ))
    return items


# ----------------------------------------------------------------------------------------------
# RefCOCOg referring (spec §4.2)
# ----------------------------------------------------------------------------------------------


def _instances_index(instances_path: str):
    data = load_json(instances_path)
    file = display_name(instances_path)
    boxes: dict[int, list] = {}
    for j, ann in enumerate(top_level_list(data, instances_path, "annotations")):
        rec = f"annotations[{j}]"
        ann_id = require(ann, "id", int, file, rec)
        boxes[ann_id] = _finite_box(require(ann, "bbox", list, file, rec), file, rec, "bbox")
    sizes: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(top_level_list(data, instances_path, "images")):
        rec = f"images[{i}]"
        sizes[require(img, "id", int, file, rec)] = (require(img, "width", int, file, rec),
                                                     require(img, "height", int, file, rec))
    return boxes, sizes


def refcoco_it_is_answer(sentence: str) -> str:
    """Upstream's single RefCOCO answer from the ref's first sentence (refcoco_referring_conversation.py).

    A sentence opening with "a", "the", "this" or "that" loses that word and every remaining word is
    followed by a space ("the man on left" -> "It is man on left ."); any other gets "It is a "
    ("man on left" -> "It is a man on left."). Upstream's quirks (the space before ".", "It is a"
    before plurals) are kept: these strings are the references.
    """
    words = sentence.split(" ")
    if words[0] in ("a", "the", "this", "that"):
        return "It is " + "".join(w + " " for w in words[1:]) + "."
    return "It is a " + sentence + "."


def referring_questions(refs_path: str, instances_path: str, dataset: str = "refcocog") -> dict[str, list[dict]]:
    """Upstream's referring question files per split (``{"val": [...], "test": [...], "train": [...]}``).

    Record: ``{file_name, image_id, category_id, question, answer, ref_id}`` with the region box as
    ``str([[x1, y1, x2, y2]])`` (int() of x, y, x + w, y + h) after the question's "?"; refs in pickle order.

    * refcocog, refcoco+ (same script): question "What is it <bbox>?", answer = every sentence,
      ``sent.lower() + "."``.
    * refcoco: question "What is in this region <bbox>?", answer = ONE string built from the first
      sentence by :func:`refcoco_it_is_answer`. Upstream's RefCOCO records have no ``ref_id``; ours
      keep it, so predictions can be matched to their ref.
    """
    if dataset not in REFERRING_SPLITS:
        raise ValueError(f"dataset must be one of {sorted(REFERRING_SPLITS)}, got {dataset!r}")
    refs = load_pickle(refs_path)
    file = display_name(refs_path)
    if not isinstance(refs, list):
        raise DataError(f"expected a list of refs, got {type(refs).__name__}", file)
    boxes, _ = _instances_index(instances_path)
    prompt = REFCOCO_REFERRING_PROMPT if dataset == "refcoco" else REFERRING_PROMPT
    out: dict[str, list[dict]] = {}
    for index, ref in enumerate(refs):
        split = require(ref, "split", str, file, index)
        ann_id = require(ref, "ann_id", int, file, index)
        if ann_id not in boxes:
            raise DataError(f"annotation {ann_id} is not in {instances_path}", file, index, "ann_id")
        x, y, w, h = boxes[ann_id]
        box = [[int(x), int(y), int(w + x), int(h + y)]]
        sentences = require(ref, "sentences", list, file, index)
        if not sentences:
            raise DataError("no sentences", file, index, "sentences")
        sents = [require(s, "sent", str, file, index, f"sentences[{j}].") for j, s in enumerate(sentences)]
        if dataset == "refcoco":
            if not sents[0]:
                raise DataError("empty first sentence", file, index, "sentences[0].sent")
            answer = refcoco_it_is_answer(sents[0])
        else:
            answer = [sent.lower() + "." for sent in sents]
        out.setdefault(split, []).append({
            "file_name": require(ref, "file_name", str, file, index),
            "image_id": require(ref, "image_id", int, file, index),
            "category_id": ref.get("category_id"),
            "question": prompt + str(box),
            "answer": answer,
            "ref_id": require(ref, "ref_id", int, file, index),
        })
    return out


_REFS_SUFFIX_RE = re.compile(r"_\d+(\.[A-Za-z]+)$")


def coco_file_of_ref(file_name: str) -> str:
    """refer's ``COCO_train2014_000000380440_<ann_id>.jpg`` -> the COCO file (upstream strips the suffix)."""
    return _REFS_SUFFIX_RE.sub(r"\1", file_name)


def referring_items(records: list[dict], image_dir: str, suffix: str, source: str = "refcocog") -> list[EvalItem]:
    """`EvalItem`s of upstream's referring records: the question is split at "?" into the prompt
    ("What is it <bbox>?") and the box list; the model sees prompt + ``suffix`` (no space, as upstream).
    ``answer``: a list of reference sentences, or one string (RefCOCO's single answer)."""
    items = []
    for i, r in enumerate(records):
        for key in ("question", "answer", "ref_id", "file_name"):
            if key not in r:
                raise DataError("missing", source, i, key)
        prompt, mark, box_text = r["question"].partition("?")
        if not mark:
            raise DataError(f"expected '<prompt>?[[x1, y1, x2, y2]]', got {r['question']!r:.80}", source, i, "question")
        try:
            region_boxes = json.loads(box_text)
        except json.JSONDecodeError:
            raise DataError(f"box list after '?' is not valid: {box_text!r:.80}", source, i, "question") from None
        if not isinstance(region_boxes, list) or not region_boxes:
            raise DataError(f"expected a list of boxes after '?', got {box_text!r:.80}", source, i, "question")
        region_boxes = [tuple(float(v) for v in _finite_box(b, source, i, "question")) for b in region_boxes]
        prompt = prompt + mark
        if prompt.count(BBOX_TOKEN) != len(region_boxes):
            raise DataError(f"{prompt.count(BBOX_TOKEN)} {BBOX_TOKEN} for {len(region_boxes)} boxes", source, i,
                            "question")
        references = [r["answer"]] if isinstance(r["answer"], str) else r["answer"]
        if not isinstance(references, list) or not references or not all(
                isinstance(a, str) and a for a in references):
            raise DataError("expected a non-empty sentence or list of sentences", source, i, "answer")
        items.append(EvalItem(
            item_id=f"{source}#{i}", task="referring",
            image_path=os.path.join(image_dir, coco_file_of_ref(r["file_name"])), user_text=prompt + suffix,
            region_boxes_xyxy_abs=region_boxes, references=list(references), upstream={**r, "prompt": prompt},
        ))
    return items


# ----------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg REC
# ----------------------------------------------------------------------------------------------


def rec_items(refer_dir: str, dataset: str, split_by: str, splits, coco2014_train_dir: str,
              template: str = DEFAULT_REC_TEMPLATE, vg_separator: str = " ",
              policy: BadRecordPolicy | None = None) -> list[EvalItem]:
    """One grounding question per (ref, sentence) of the given splits; GT = the referred object's box."""
    from chatterbox.data.readers.refcoco import read_refer

    if "{expression}" not in template:
        raise ValueError(f"REC template {template!r} has no '{{expression}}' placeholder")
    items = []
    for split in splits:
        records = read_refer(refer_dir, dataset, split_by, split, coco2014_train_dir, policy)
        for rec in records:
            region = rec.regions[0]
            for j, sentence in enumerate(rec.extra["sentences"]):
                items.append(EvalItem(
                    item_id=f"{rec.file}#{rec.index}/{j}", task="grounding", image_path=rec.image_path,
                    user_text=template.format(expression=sentence) + vg_separator + VG_TOKEN,
                    gt_boxes_xyxy_abs=[tuple(region.box_xyxy_abs)], image_size=rec.image_size, group=split,
                    upstream={"ref_id": rec.extra["ref_id"], "ann_id": region.ann_id, "image_id": rec.extra["image_id"],
                              "split": split, "sentence": sentence},
                ))
    return items


# ----------------------------------------------------------------------------------------------
# CB-MRG dialogues
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MrgOptions:
    """How a CB-MRG record becomes evaluation rounds (evaluation/README.md, "CB-MRG").

    ``regions``: "auto" turns a question's box into ``<bbox>`` input where the question allows it
    (an ``<it>`` / ``<region>`` placeholder, or the one box's name in the question -> "the region
    <bbox>"); "off" never gives regions. ``grounding``: "auto" appends ``[VG]`` to every question whose
    answer carries exactly one box (that box is the target); "off" never.
    """

    regions: str = "auto"
    grounding: str = "auto"
    vg_separator: str = " "
    region_phrase: str = "the region"
    max_rounds: int = 0  # 0 = every round of the record

    def __post_init__(self):
        for name in ("regions", "grounding"):
            if getattr(self, name) not in ("auto", "off"):
                raise ValueError(f"MrgOptions.{name} must be 'auto' or 'off', got {getattr(self, name)!r}")


@dataclass
class MrgRound:
    index: int  # 1-based round number within the dialogue
    plain_question: str  # the question as text only (history form): box group cut, placeholders as words
    user_text: str  # what the model is asked this round (with <bbox> / [VG])
    region_boxes_xyxy_abs: list[tuple[float, float, float, float]]
    target_box_xyxy_abs: tuple[float, float, float, float] | None  # [VG] rounds
    reference_answer: str  # ground-truth answer text (box group cut, region phrase substituted)

    @property
    def is_referring(self) -> bool:
        return bool(self.region_boxes_xyxy_abs)

    @property
    def is_grounding(self) -> bool:
        return self.target_box_xyxy_abs is not None


@dataclass
class MrgDialogue:
    dialogue_id: str  # "<file>#<record index>"
    image_path: str
    image_size: tuple[int, int] | None
    rounds: list[MrgRound]


def _plain(text: str) -> str:
    return text.replace("<it>", "it").replace("<region>", "region")


def _reference_answer(turn: DialogueTurn, where: tuple) -> str:
    if turn.answer:
        return _plain(turn.answer)
    if turn.answer_boxes:  # the answer was only a box group: name its objects, as the training builder does
        return " and ".join(f"the {b.name}" for b in turn.answer_boxes) + "."
    raise DataError("empty answer", *where)


def _name_pattern(name: str):
    base = re.sub(r"_\d+$", "", name)  # VG cleaning renames merged boxes "name_k"
    variants = [v for v in dict.fromkeys([f"the {name}", name, f"the {base}", base]) if v]
    return [re.compile(rf"\b{re.escape(v)}\b") for v in variants]


def build_mrg_dialogue(record: DialogueRecord, options: MrgOptions = MrgOptions()) -> MrgDialogue:
    """The evaluation rounds of one CB-MRG record (see `MrgOptions`)."""
    turns = record.turns[: options.max_rounds] if options.max_rounds else record.turns
    rounds = []
    for k, turn in enumerate(turns):
        where = (record.file, record.index, f"conversation[{2 * k}].value")
        question = turn.question
        plain_question = _plain(question)
        if not plain_question:
            raise DataError("question is empty once its box group is cut", *where)
        answer = _reference_answer(turn, (record.file, record.index, f"conversation[{2 * k + 1}].value"))
        user_text, region_boxes = plain_question, []
        if options.regions == "auto" and turn.question_boxes:
            boxes = [b.box_xyxy_abs for b in turn.question_boxes]
            tokens = " ".join([BBOX_TOKEN] * len(boxes))
            for placeholder, word in (("<it>", "it"), ("<region>", "region")):
                if placeholder in question:
                    user_text = _plain(question.replace(placeholder, f"{word} {tokens}", 1))
                    region_boxes = boxes
                    break
            else:
                if len(boxes) == 1:
                    for pattern in _name_pattern(turn.question_boxes[0].name):
                        if pattern.search(question):
                            user_text = _plain(pattern.sub(f"{options.region_phrase} {BBOX_TOKEN}", question, count=1))
                            answer = pattern.sub(options.region_phrase, answer)
                            region_boxes = boxes
                            break
        target = None
        if options.grounding == "auto" and len(turn.answer_boxes) == 1:
            target = tuple(turn.answer_boxes[0].box_xyxy_abs)
            user_text = user_text + options.vg_separator + VG_TOKEN
        rounds.append(MrgRound(k + 1, plain_question, user_text, region_boxes, target, answer))
    if not rounds:
        raise DataError("no rounds", record.file, record.index, "conversation")
    return MrgDialogue(f"{record.file}#{record.index}", record.image_path, record.image_size, rounds)


def mrg_dialogues(cb_mrg_path: str, image_dir: str, options: MrgOptions = MrgOptions(),
                  policy: BadRecordPolicy | None = None, limit: int = 0) -> list[MrgDialogue]:
    """CB-MRG records -> dialogues. ``policy`` ("error" by default) decides what a bad record does;
    records without any scored round (no region and no [VG]) are kept: their rounds still run."""
    policy = policy or BadRecordPolicy()
    out = []
    for record in read_conversation_file(cb_mrg_path, image_dir, "xyxy", policy):
        try:
            out.append(build_mrg_dialogue(record, options))
        except DataError as e:
            policy.handle(e)
        if limit and len(out) >= limit:
            break
    return out
