"""ChatterBox's own dialogue format, for your own data: JSON Lines, one image and its dialogue per line.

    {"id": "kitchen-7", "image": "images/7.jpg", "image_wh": [640, 480], "rounds": [
      {"question": "What is <bbox> for?", "answer": "Boiling water.",
       "region_boxes_xyxy_abs": [[10, 20, 110, 140]]},
      {"question": "Where is the cup? [VG]", "answer": "On its right.",
       "grounding_boxes_xyxy_abs": [[150, 60, 210, 140]]}]}      (all on one line)

Questions are written as one would ask them in chat: each `<bbox>` has one box in ``region_boxes_xyxy_abs``
(in order), and a `[VG]` (at most one per question) has the box or boxes it must find in
``grounding_boxes_xyxy_abs``. Boxes are x1, y1, x2, y2 in pixels of the image. Answers are plain text.
``image`` is relative to the file's folder, or absolute; ``image_wh`` (optional) lets boxes be checked
against the image size here rather than when the image is loaded; ``id`` (optional) is yours, not read.
Records are numbered by line (the first line is record 1); blank lines are no record.
"""
from __future__ import annotations

import json
import os

from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.readers.common import (box_to_xyxy, display_name, read_image_wh, read_records, require,
                                            require_file)
from chatterbox.data.records import JsonlDialogueRecord, Turn
from chatterbox.tokens import (BBOX_TOKEN, IMAGE_END_TOKEN, IMAGE_PATCH_TOKEN, IMAGE_PLACEHOLDER, IMAGE_START_TOKEN,
                               VG_TOKEN)

RECORD_FIELDS = ("id", "image", "image_wh", "rounds")
ROUND_FIELDS = ("question", "answer", "region_boxes_xyxy_abs", "grounding_boxes_xyxy_abs")
#: tokens the pipeline places itself (the image's); answers may not hold `<bbox>` or `[VG]` either
IMAGE_TOKENS = (IMAGE_PLACEHOLDER, IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN)


def _reject_unknown_fields(obj: dict, known: tuple[str, ...], file: str, line: int, prefix: str = "") -> None:
    # A misspelt optional field (e.g. "image_hw") would otherwise be ignored without a word.
    for key in obj:
        if key not in known:
            raise DataError(f"unknown field; expected one of {list(known)}", file, line, f"{prefix}{key}")


def _boxes(round_: dict, key: str, file: str, line: int, prefix: str, image_size) -> list:
    if key not in round_:
        return []
    boxes = require(round_, key, list, file, line, prefix)
    return [box_to_xyxy(box, "xyxy", file, line, f"{prefix}{key}[{i}]", image_size) for i, box in enumerate(boxes)]


def _parse_round(round_, k: int, file: str, line: int, image_size) -> Turn:
    prefix = f"rounds[{k}]."
    question = require(round_, "question", str, file, line, prefix)
    answer = require(round_, "answer", str, file, line, prefix)
    _reject_unknown_fields(round_, ROUND_FIELDS, file, line, prefix)
    for token in IMAGE_TOKENS:
        if token in question:
            raise DataError(f"contains {token}; the image goes in front of the first question by itself", file,
                            line, prefix + "question")
    if not question.replace(VG_TOKEN, "").strip():
        raise DataError("empty question", file, line, prefix + "question")
    for token in IMAGE_TOKENS + (BBOX_TOKEN, VG_TOKEN):
        if token in answer:
            raise DataError(f"contains {token}; answers are plain text ({BBOX_TOKEN} and {VG_TOKEN} go in questions)",
                            file, line, prefix + "answer")
    if not answer.strip():
        raise DataError("empty answer", file, line, prefix + "answer")
    region_boxes = _boxes(round_, "region_boxes_xyxy_abs", file, line, prefix, image_size)
    grounding_boxes = _boxes(round_, "grounding_boxes_xyxy_abs", file, line, prefix, image_size)
    n_bbox = question.count(BBOX_TOKEN)
    if n_bbox != len(region_boxes):
        raise DataError(f"{n_bbox} {BBOX_TOKEN} in the question but {len(region_boxes)} box(es)", file, line,
                        prefix + "region_boxes_xyxy_abs")
    n_vg = question.count(VG_TOKEN)
    if n_vg > 1:
        raise DataError(f"{n_vg} {VG_TOKEN} in the question; at most one", file, line, prefix + "question")
    if bool(n_vg) != bool(grounding_boxes):
        raise DataError(f"{n_vg} {VG_TOKEN} in the question but {len(grounding_boxes)} box(es); a {VG_TOKEN} needs "
                        f"its box(es) and boxes need a {VG_TOKEN}", file, line, prefix + "grounding_boxes_xyxy_abs")
    return Turn(question, answer, region_boxes, grounding_boxes if n_vg else None)


def _parse_line(raw: bytes, index: int, file: str, folder: str) -> JsonlDialogueRecord | None:
    line = index + 1
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e}", file, line) from e
    if not text.strip():
        return None
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON at line {line} column {e.colno}: {e.msg}", file, line) from e
    image = require(item, "image", str, file, line)
    _reject_unknown_fields(item, RECORD_FIELDS, file, line)
    image_path = os.path.join(folder, image)
    # Checked here rather than when a stream first draws the record: a run stops at start-up, not hours in.
    if not os.path.isfile(image_path):
        raise DataError(f"image file not found: {image_path}", file, line, "image")
    image_size = read_image_wh(item, file, line)
    rounds = require(item, "rounds", list, file, line)
    if not rounds:
        raise DataError("empty dialogue", file, line, "rounds")
    turns = [_parse_round(round_, k, file, line, image_size) for k, round_ in enumerate(rounds)]
    return JsonlDialogueRecord(file, line, image_path, turns, image_size)


def read_jsonl(path: str, policy: BadRecordPolicy | None = None) -> list[JsonlDialogueRecord]:
    require_file(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")  # bytes, so that a line that is not UTF-8 is one bad record
    file = display_name(path)
    folder = os.path.dirname(os.path.abspath(path))
    return read_records(lines, file, lambda raw, i: _parse_line(raw, i, file, folder), policy)


def read_jsonl_files(paths: list[str], policy: BadRecordPolicy | None = None) -> list[JsonlDialogueRecord]:
    return [record for path in paths for record in read_jsonl(path, policy)]
