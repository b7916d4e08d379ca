"""CB-300K conversation files: CB_MRG.json, CB_REF.json, CB_GND.json, CB_LC.json (spec §3.8).

Layout: ``{"data": [{"image": "VG_100K/<id>.jpg", "conversation": [{"from": "human"|"gpt", "value":
str}, ...], "id"?: int, "image_wh"?: [w, h]}, ...]}``; images under the Visual Genome folder; boxes in
the `<name:[x1, y1, x2, y2]>` groups are xyxy VG pixels. The CB-materials files share this schema
(see cb_materials.py), with COCO images and, for the RefCOCO conversions, xywh boxes.
"""
from __future__ import annotations

import os

from chatterbox.data.annotations import AnnotationError, split_box_group
from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.readers.common import (box_to_xyxy, display_name, load_json, read_image_wh, read_records,
                                            require, top_level_list)
from chatterbox.data.records import DialogueRecord, DialogueTurn, NamedBox

CB300K_FILES = {"mrg": "CB_MRG.json", "ref": "CB_REF.json", "gnd": "CB_GND.json", "lc": "CB_LC.json"}


def parse_conversation_record(item, index: int, file: str, image_dir: str, layout: str = "xyxy") -> DialogueRecord:
    image = require(item, "image", str, file, index)
    conversation = require(item, "conversation", list, file, index)
    if not conversation:
        raise DataError("empty dialogue", file, index, "conversation")
    if len(conversation) % 2:
        raise DataError(f"odd number of messages ({len(conversation)}); expected human/gpt pairs", file, index,
                        "conversation")
    image_size = read_image_wh(item, file, index)
    turns = []
    for k in range(0, len(conversation), 2):
        texts = []
        for j, role in ((k, "human"), (k + 1, "gpt")):
            msg = conversation[j]
            prefix = f"conversation[{j}]."
            speaker = require(msg, "from", str, file, index, prefix)
            if speaker != role:
                raise DataError(f"expected {role!r}, got {speaker!r}", file, index, prefix + "from")
            value = require(msg, "value", str, file, index, prefix)
            try:
                parsed = split_box_group(value, layout)
            except AnnotationError as e:
                raise DataError(str(e), file, index, prefix + "value") from e
            boxes = [NamedBox(b.name, box_to_xyxy(list(b.box_xyxy_abs), "xyxy", file, index, prefix + "value",
                                                  image_size)) for b in parsed.boxes]
            if not parsed.text and not boxes:
                raise DataError("empty message", file, index, prefix + "value")
            texts.append((parsed, boxes))
        (q, q_boxes), (a, a_boxes) = texts
        turns.append(DialogueTurn(question=q.text, answer=a.text, question_boxes=q_boxes, answer_boxes=a_boxes,
                                  question_group_unusable=q.unusable_group, answer_group_unusable=a.unusable_group))
    category_id = item.get("category_id") if isinstance(item.get("category_id"), int) else None
    return DialogueRecord(file=file, index=index, image_path=os.path.join(image_dir, image), turns=turns,
                          image_size=image_size, category_id=category_id)


def read_conversation_file(path: str, image_dir: str, layout: str = "xyxy",
                           policy: BadRecordPolicy | None = None) -> list[DialogueRecord]:
    items = top_level_list(load_json(path), path, "data")
    file = display_name(path)
    return read_records(items, file, lambda item, i: parse_conversation_record(item, i, file, image_dir, layout),
                        policy)


def read_cb300k(cb300k_dir: str, part: str, vg_dir: str, policy: BadRecordPolicy | None = None) -> list[DialogueRecord]:
    """``part`` is one of "mrg", "ref", "gnd", "lc"; images resolve against the VG folder."""
    if part not in CB300K_FILES:
        raise ValueError(f"unknown CB-300K part {part!r}; expected one of {sorted(CB300K_FILES)}")
    return read_conversation_file(os.path.join(cb300k_dir, CB300K_FILES[part]), vg_dir, "xyxy", policy)
