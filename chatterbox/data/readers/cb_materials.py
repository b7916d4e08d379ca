"""CB-materials: CB-refcoco-GND.json, CB-coco-GND.json, CB-refcoco-REF.json (spec §3.4, §3.5).

Same schema as CB-300K plus ``category_id``. CB-refcoco-* use COCO 2014 train images and xywh boxes;
CB-coco-GND uses COCO 2017 train images and xyxy boxes.
"""
from __future__ import annotations

import os

from chatterbox.data.errors import BadRecordPolicy
from chatterbox.data.readers.cb300k import read_conversation_file
from chatterbox.data.records import DialogueRecord

# file, image subfolder of its COCO root, box layout in the file
CB_MATERIALS_FILES = {
    "refcoco_gnd": ("CB-refcoco-GND.json", "coco2014", "train2014", "xywh"),
    "coco_gnd": ("CB-coco-GND.json", "coco2017", "train2017", "xyxy"),
    "refcoco_ref": ("CB-refcoco-REF.json", "coco2014", "train2014", "xywh"),
}


def read_cb_materials(materials_dir: str, part: str, coco2014_dir: str, coco2017_dir: str,
                      policy: BadRecordPolicy | None = None) -> list[DialogueRecord]:
    if part not in CB_MATERIALS_FILES:
        raise ValueError(f"unknown CB-materials part {part!r}; expected one of {sorted(CB_MATERIALS_FILES)}")
    file, coco, subdir, layout = CB_MATERIALS_FILES[part]
    image_dir = os.path.join(coco2014_dir if coco == "coco2014" else coco2017_dir, subdir)
    return read_conversation_file(os.path.join(materials_dir, file), image_dir, layout, policy)
