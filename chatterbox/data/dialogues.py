"""Turning source records into concrete dialogues, as upstream builds them per source (spec §3.4-3.6).

A builder takes a source record and a `random.Random` (seeded per draw, so a draw is reproducible) and
returns a `Sample` whose `<bbox>` tokens each have a region box and whose `[VG]` has its target boxes,
or None when the record has nothing this builder can use (the caller draws another record; such
records are also filtered out up front by the matching ``*_eligible`` function and counted).

Deliberate differences from upstream (spec §5), each keeping upstream's data distribution otherwise:
* grounding on CB-GND / CB-LC picks the first turn, after the random start, whose answer has exactly
  one box (upstream's loop never terminates); with none after the start, the record's first such turn;
* `<it>` / `<region>` turns record their boxes (one `<bbox>` per box) instead of a `<bbox>` without a
  box; the name-replacement branch only fires when the name is actually in the question;
* turn text is cut at the box group only (no dropped last character);
* `[VG]` is appended as ``question + vg_separator + "[VG]"`` (default " ", the evaluation prompt's form);
* an answer left empty once its box group is cut gets the group's names ("the dog and the cat") so
  that every assistant turn has text to supervise.
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

from chatterbox.data.errors import DataError
from chatterbox.data.records import (DialogueRecord, DialogueTurn, JsonlDialogueRecord, RegionRecord, Sample,
                                     TaskKind, Turn)
from chatterbox.data import templates as T
from chatterbox.tokens import BBOX_TOKEN, IMAGE_PLACEHOLDER, VG_TOKEN


@dataclass(frozen=True)
class BuildOptions:
    image_prefix: str = "<image>\n "  # how upstream opens the first human message of CB/grounding/VQA data
    vg_separator: str = " "
    # CB-GND / CB-LC: "first" = upstream, one `[VG]` (the first single-box answer); "all" = every single-box
    # answer from there on gets its `[VG]` (several queries about one image in one sample).
    grounding_rounds: str = "first"
    region_name_replace_prob: float = 0.3  # CB-MRG: chance a single-box turn's name becomes "the region <bbox>"
    max_regions_coco_det: int = 100
    max_regions_refcoco: int = 15
    max_regions_vg: int = 15
    max_regions_flickr: int = 150
    min_box_side_squashed: float = 2.0  # mmdet-style sources: drop boxes with w or h <= 2 px at 224²
    clip_size: int = 224
    coco_det_augment: bool = True  # mmdet RandomShift(p=0.5, +-32 px) + RandomFlip(p=0.5) on COCO detection
    shift_prob: float = 0.5
    max_shift_px: int = 32
    flip_prob: float = 0.5


def _sid(record) -> str:
    return f"{record.file}#{record.index}"


def _answer_text(turn: DialogueTurn) -> str:
    if turn.answer:
        return turn.answer
    names = [b.name for b in turn.answer_boxes]
    if not names:  # readers reject messages with neither text nor boxes, so this is a programming error
        raise ValueError(f"turn has neither answer text nor answer boxes: {turn}")
    return " and ".join(f"the {n}" for n in names) + "."


def _random_start(rng: random.Random, n_rounds: int) -> int:
    """Upstream's start message s in {rand, n//2, n//4, n//6, n//8} (n messages), rounded down to even."""
    n_messages = 2 * n_rounds
    s = rng.choice([rng.randrange(n_messages), n_messages // 2, n_messages // 4, n_messages // 6, n_messages // 8])
    return (s - s % 2) // 2


def _first_image_turn(turns: list[Turn], options: BuildOptions) -> list[Turn]:
    turns[0].user = options.image_prefix + turns[0].user
    return turns


# ---------------------------------------------------------------------------------------------------
# grounding (DG)


def single_box_rounds(record: DialogueRecord) -> list[int]:
    return [i for i, t in enumerate(record.turns) if len(t.answer_boxes) == 1 and t.question]


def first_round_grounding_eligible(record: DialogueRecord) -> bool:
    return bool(record.turns and record.turns[0].answer_boxes and record.turns[0].question)


def build_first_round_grounding(record: DialogueRecord, rng: random.Random, options: BuildOptions) -> Sample | None:
    """CB-refcoco-GND / CB-coco-GND: first round only, GT = every box of the answer group (k >= 1)."""
    if not first_round_grounding_eligible(record):
        return None
    turn = record.turns[0]
    user = turn.question + options.vg_separator + VG_TOKEN
    out = Turn(user=user, assistant=_answer_text(turn),
               grounding_boxes_xyxy_abs=[b.box_xyxy_abs for b in turn.answer_boxes])
    return Sample(_sid(record), record.image_path, "grounding", _first_image_turn([out], options), "crop",
                  record.image_size)


def chain_grounding_eligible(record: DialogueRecord) -> bool:
    return bool(single_box_rounds(record))


def _plain(text: str, logic: bool) -> str:
    text = text.replace("<it>", "it").replace("<region>", "region")
    return text.replace("[it]", "it") if logic else text


def build_chain_grounding(record: DialogueRecord, rng: random.Random, options: BuildOptions,
                          logic: bool = False) -> Sample | None:
    """CB-GND (random start) / CB-LC (``logic``: no random start, `[it]` -> it): context rounds, then the
    first round whose answer has exactly one box gets `[VG]` with that box as target; stop there. With
    ``options.grounding_rounds == "all"`` the dialogue goes on to its end and every later single-box
    answer gets its `[VG]` too."""
    eligible = single_box_rounds(record)
    if not eligible:
        return None
    start = 0 if logic else _random_start(rng, len(record.turns))
    after = [i for i in eligible if i >= start]
    if not after:
        start = 0
        after = eligible
    targets = set(after) if options.grounding_rounds == "all" else {after[0]}
    turns = []
    for i in range(start, max(targets) + 1):
        t = record.turns[i]
        question = _plain(t.question, logic)
        if not question:
            raise DataError("question is empty once its box group is cut", record.file, record.index,
                            f"conversation[{2 * i}].value")
        if i in targets:
            turns.append(Turn(question + options.vg_separator + VG_TOKEN, _plain(_answer_text(t), logic),
                              grounding_boxes_xyxy_abs=[t.answer_boxes[0].box_xyxy_abs]))
        else:
            turns.append(Turn(question, _plain(_answer_text(t), logic)))
    return Sample(_sid(record), record.image_path, "grounding", _first_image_turn(turns, options), "crop",
                  record.image_size)


def build_region_grounding(record: RegionRecord, rng: random.Random, options: BuildOptions) -> Sample | None:
    """COCO instances / refer REC: "Where is the <text>?" + `[VG]` -> the region's box (single round).

    COCO images are used only where the category is unique in the image (as upstream's COCO QA set)."""
    names = [r.text for r in record.regions]
    candidates = [r for r in record.regions if names.count(r.text) == 1]
    if not candidates:
        return None
    region = rng.choice(candidates)
    sentences = record.extra.get("sentences")
    phrase = rng.choice(sentences) if sentences else region.text
    user = f"Where is the {phrase}?" if not sentences else f"Where is {phrase}?"
    turn = Turn(user + options.vg_separator + VG_TOKEN, f"Here is the {region.text}." if not sentences else
                f"Here it is: {phrase}.", grounding_boxes_xyxy_abs=[region.box_xyxy_abs])
    return Sample(_sid(record), record.image_path, "grounding", _first_image_turn([turn], options), "crop",
                  record.image_size)


# ---------------------------------------------------------------------------------------------------
# referring from CB conversations (DR Jack*)


def _name_variants(name: str) -> list[str]:
    base = re.sub(r"_\d+$", "", name)  # VG cleaning renames merged boxes "name_k"
    return [v for v in dict.fromkeys([f"the {name}", name, f"the {base}", base]) if v]


def _referring_turn(turn: DialogueTurn, rng: random.Random, options: BuildOptions, allow_name_replace: bool,
                    force: bool) -> Turn | None:
    """The turn as a region question if it can carry its boxes, else None (plain context)."""
    q, boxes = turn.question, turn.question_boxes
    if not boxes:
        return None
    bbox_tokens = " ".join([BBOX_TOKEN] * len(boxes))
    answer = _plain(_answer_text(turn), False)
    for placeholder, word in (("<it>", "it"), ("<region>", "region")):
        if placeholder in q:
            user = _plain(q.replace(placeholder, f"{word} {bbox_tokens}", 1), False)
            return Turn(user, answer, region_boxes_xyxy_abs=[b.box_xyxy_abs for b in boxes])
    if len(boxes) != 1 or not allow_name_replace:
        return None
    if not force and rng.random() >= options.region_name_replace_prob:
        return None
    for variant in _name_variants(boxes[0].name):
        pattern = re.compile(rf"\b{re.escape(variant)}\b")
        if pattern.search(q):
            phrase = rng.choice(["the region", "this region"])
            user = pattern.sub(f"{phrase} {BBOX_TOKEN}", q, count=1)
            answer = pattern.sub(phrase, answer)
            return Turn(_plain(user, False), answer, region_boxes_xyxy_abs=[boxes[0].box_xyxy_abs])
    return None


def cb_referring_eligible(record: DialogueRecord, allow_name_replace: bool) -> bool:
    rng = random.Random(0)
    return any(_referring_turn(t, rng, BuildOptions(), allow_name_replace, True) for t in record.turns)


def build_cb_referring(record: DialogueRecord, rng: random.Random, options: BuildOptions,
                       allow_name_replace: bool, clip_resize: str = "crop") -> Sample | None:
    """CB-MRG (``allow_name_replace``: JackVanilla) / CB-REF / CB-refcoco-REF (JackReferring): random
    start, context rounds as plain text, stop after the first round that carries region boxes."""
    start = _random_start(rng, len(record.turns))
    for force in (False, True):
        turns = []
        for i in range(start, len(record.turns)):
            t = record.turns[i]
            ref = _referring_turn(t, rng, options, allow_name_replace, force)
            if ref is not None:
                turns.append(ref)
                return Sample(_sid(record), record.image_path, "referring", _first_image_turn(turns, options),
                              clip_resize, record.image_size)
            if not t.question:
                break  # a question that was only a box group cannot be plain context
            turns.append(Turn(_plain(t.question, False), _plain(_answer_text(t), False)))
        start = 0
    return None


# ---------------------------------------------------------------------------------------------------
# referring from region annotations (DR mmdet sets)


def _usable_regions(record: RegionRecord, options: BuildOptions):
    """mmdet's filter: drop boxes whose side is <= 2 px once squashed to the 224² CLIP input."""
    w, h = record.image_size
    sx, sy = options.clip_size / w, options.clip_size / h
    return [r for r in record.regions
            if (r.box_xyxy_abs[2] - r.box_xyxy_abs[0]) * sx > options.min_box_side_squashed
            and (r.box_xyxy_abs[3] - r.box_xyxy_abs[1]) * sy > options.min_box_side_squashed]


def regions_eligible(record: RegionRecord) -> bool:
    return bool(record.regions)


def _shifted_regions(regions, record: RegionRecord, dx: int, dy: int, options: BuildOptions):
    """Regions that stay wider and taller than the mmdet filter after shifting the squashed image."""
    w, h = record.image_size
    sx, sy, size = options.clip_size / w, options.clip_size / h, options.clip_size
    kept = []
    for r in regions:
        x1, y1, x2, y2 = r.box_xyxy_abs
        x1, x2 = (min(max(v * sx + dx, 0), size) for v in (x1, x2))
        y1, y2 = (min(max(v * sy + dy, 0), size) for v in (y1, y2))
        if x2 - x1 > options.min_box_side_squashed and y2 - y1 > options.min_box_side_squashed:
            kept.append(r)
    return kept


def build_coco_det(record: RegionRecord, rng: random.Random, options: BuildOptions, class_names: list[str]) -> Sample | None:
    """≤100 shuffled objects, one `<bbox>` round each, after upstream's shift/flip augmentation."""
    regions = _usable_regions(record, options)
    if not regions:
        return None
    augment = None
    if options.coco_det_augment:
        dx = dy = 0
        if rng.random() < options.shift_prob:
            dx = rng.randint(-options.max_shift_px, options.max_shift_px)
            dy = rng.randint(-options.max_shift_px, options.max_shift_px)
            shifted = _shifted_regions(regions, record, dx, dy, options)
            if shifted:  # mmdet keeps the unshifted image when a shift would remove every box
                regions = shifted
            else:
                dx = dy = 0
        augment = (dx, dy, rng.random() < options.flip_prob)
    regions = rng.sample(regions, len(regions))[: options.max_regions_coco_det]
    turns = []
    for k, r in enumerate(regions):
        user = (T.coco_det_preamble(class_names) if k == 0 else "") + BBOX_TOKEN
        answer = rng.choice(T.COCO_DET_HEADS) + r.text + rng.choice(T.ANSWER_TAILS)
        turns.append(Turn(user, answer, region_boxes_xyxy_abs=[r.box_xyxy_abs]))
    return Sample(_sid(record), record.image_path, "referring", turns, "squash", record.image_size,
                  clip_augment=augment)


def build_refcoco_family(record: RegionRecord, rng: random.Random, options: BuildOptions, dataset: str) -> Sample | None:
    """RefCOCO / RefCOCO+ (fixed preamble, question " <bbox>") and RefCOCOg (REFG templates naming
    "region{i} <bbox>"); answer = head + caption + tail; <= 15 shuffled boxes, one round each."""
    regions = _usable_regions(record, options)
    if not regions:
        return None
    regions = rng.sample(regions, len(regions))[: options.max_regions_refcoco]
    turns = []
    for k, r in enumerate(regions):
        if dataset == "refcocog":
            question = T.fill(rng.choice(T.REFG_QUESTIONS), f"region{k + 1} {BBOX_TOKEN}")
            user = (T.OVERVIEW_PREAMBLE if k == 0 else "") + question
        else:
            user = (T.REFCOCO_PREAMBLE if k == 0 else "") + " " + BBOX_TOKEN
        answer = rng.choice(T.REFCOCO_ANSWER_HEADS) + r.text + rng.choice(T.ANSWER_TAILS)
        turns.append(Turn(user.strip() if k else user, answer, region_boxes_xyxy_abs=[r.box_xyxy_abs]))
    return Sample(_sid(record), record.image_path, "referring", turns, "squash", record.image_size)


def build_vg(record: RegionRecord, rng: random.Random, options: BuildOptions) -> Sample | None:
    regions = _usable_regions(record, options)
    if not regions:
        return None
    regions = rng.sample(regions, len(regions))[: options.max_regions_vg]
    turns = []
    for k, r in enumerate(regions):
        question = T.fill(rng.choice(T.FINAL_QUESTIONS), f"region{k + 1} {BBOX_TOKEN}")
        caption = re.sub(r"^a ", "", r.text.strip())
        answer = rng.choice(T.REFCOCO_ANSWER_HEADS) + caption + rng.choice(T.ANSWER_TAILS)
        turns.append(Turn((T.OVERVIEW_PREAMBLE if k == 0 else "") + question, answer,
                          region_boxes_xyxy_abs=[r.box_xyxy_abs]))
    return Sample(_sid(record), record.image_path, "referring", turns, "squash", record.image_size)


def build_flickr30k(record: RegionRecord, rng: random.Random, options: BuildOptions) -> Sample | None:
    """Turn 1: all regions ("region1 <bbox>,region2 <bbox>,...") in a FINAL template, answered by the
    lower-cased caption; then one turn per region naming "region {i}" answered by its phrase."""
    regions = _usable_regions(record, options)[: options.max_regions_flickr]
    if not regions or not record.caption:
        return None
    listing = ",".join(f"region{k + 1} {BBOX_TOKEN}" for k in range(len(regions)))
    caption = record.caption.strip().lower().rstrip(".")
    turns = [Turn(T.OVERVIEW_PREAMBLE + T.fill(rng.choice(T.FINAL_QUESTIONS), listing), caption,
                  region_boxes_xyxy_abs=[r.box_xyxy_abs for r in regions])]
    for k, r in enumerate(regions):
        turns.append(Turn(T.fill(rng.choice(T.REGION_QUESTIONS), f"region {k + 1}"), r.text))
    return Sample(_sid(record), record.image_path, "referring", turns, "squash", record.image_size)


def build_refer_reg(record: RegionRecord, rng: random.Random, options: BuildOptions) -> Sample | None:
    """refer-toolkit REG: upstream's RefCOCOg referring-eval prompt "What is it <bbox>?" -> a sentence."""
    sentences = record.extra.get("sentences") or [record.regions[0].text]
    turn = Turn(f"What is it {BBOX_TOKEN}?", rng.choice(sentences), region_boxes_xyxy_abs=[record.regions[0].box_xyxy_abs])
    return Sample(_sid(record), record.image_path, "referring", _first_image_turn([turn], options), "crop",
                  record.image_size)


# ---------------------------------------------------------------------------------------------------
# VQA (DV)


def build_cb_vqa(record: DialogueRecord, rng: random.Random, options: BuildOptions, logic: bool) -> Sample | None:
    """CB-LC / CB-MRG as plain VQA: the whole conversation, box groups cut, `[it]` -> it (LC)."""
    turns = []
    for t in record.turns:
        if not t.question:
            break
        turns.append(Turn(_plain(t.question, logic), _plain(_answer_text(t), logic)))
    if not turns:
        return None
    return Sample(_sid(record), record.image_path, "vqa", _first_image_turn(turns, options), "crop",
                  record.image_size)


def build_llava(record: DialogueRecord, rng: random.Random, options: BuildOptions) -> Sample | None:
    """LLaVA-Instruct verbatim (its `<image>` already sits in the first human message)."""
    turns = [Turn(t.question, t.answer) for t in record.turns]
    if IMAGE_PLACEHOLDER not in turns[0].user:
        raise DataError(f"first message lacks {IMAGE_PLACEHOLDER}", record.file, record.index, "conversations")
    return Sample(_sid(record), record.image_path, "vqa", turns, "crop", record.image_size)


# ---------------------------------------------------------------------------------------------------
# your own dialogues (ChatterBox JSONL, readers/jsonl.py)


def jsonl_grounding_eligible(record: JsonlDialogueRecord) -> bool:
    return any(t.grounding_boxes_xyxy_abs for t in record.turns)


def jsonl_referring_eligible(record: JsonlDialogueRecord) -> bool:
    return any(t.region_boxes_xyxy_abs for t in record.turns)


def jsonl_vqa_eligible(record: JsonlDialogueRecord) -> bool:
    # A `<bbox>` cannot be taken out of a question without breaking its sentence.
    return not jsonl_referring_eligible(record)


def _without_vg(question: str) -> str:
    return re.sub(rf"\s*{re.escape(VG_TOKEN)}\s*", " ", question).strip()


def build_jsonl(record: JsonlDialogueRecord, rng: random.Random, options: BuildOptions, task: TaskKind) -> Sample:
    """A JSONL dialogue as written, every round. The grounding stream keeps its `[VG]` tokens and targets; the
    referring and VQA streams take `[VG]` out of the questions, as their batches carry no grounding targets."""
    if task == "grounding":
        turns = [dataclasses.replace(t) for t in record.turns]  # copied: _first_image_turn edits turns[0]
    else:
        turns = [Turn(_without_vg(t.user), t.assistant, t.region_boxes_xyxy_abs) for t in record.turns]
    return Sample(_sid(record), record.image_path, task, _first_image_turn(turns, options), "crop",
                  record.image_size)
