"""COCO instances json (``annotations/instances_{train,val}2017.json``, and COCO 2014 via the refer
toolkit's instances.json).

Layout: ``{"images": [{id, file_name, width, height}], "annotations": [{id, image_id, category_id, bbox
[x, y, w, h], iscrowd, ...}], "categories": [{id, name}]}``. One `RegionRecord` per image, regions in
file order, text = category name. Crowd annotations are not objects (mmdet treats them as "ignore"):
they are left out and counted in `CocoInstances.num_crowd`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from chatterbox.data.errors import BadRecordPolicy
from chatterbox.data.readers.common import (box_to_xyxy, display_name, load_json, read_categories, read_records,
                                            require, require_image_entry, require_known, top_level_list)
from chatterbox.data.records import Region, RegionRecord


@dataclass
class CocoInstances:
    file: str
    categories: dict[int, str]
    images: dict[int, dict]
    records: list[RegionRecord]
    #: annotation id -> (image id, box xyxy pixels, category id)
    annotations: dict[int, tuple[int, tuple[float, float, float, float], int]] = field(default_factory=dict)
    num_crowd: int = 0


def read_coco_instances(path: str, image_dir: str, policy: BadRecordPolicy | None = None) -> CocoInstances:
    data = load_json(path)
    file = display_name(path)
    categories = read_categories(data, path, file)

    def parse_image(img, i):
        return require_image_entry(img, file, f"images[{i}]"), img

    images = dict(read_records(top_level_list(data, path, "images"), file, parse_image, policy))
    by_image: dict[int, list[Region]] = {}
    out = CocoInstances(file, categories, images, [])

    def parse_annotation(ann, i):
        rec = f"annotations[{i}]"
        image_id = require_known(ann, "image_id", images, file, rec, "image id")
        category_id = require_known(ann, "category_id", categories, file, rec, "category")
        img = images[image_id]
        box = box_to_xyxy(require(ann, "bbox", list, file, rec), "xywh", file, rec, "bbox",
                          (img["width"], img["height"]))
        ann_id = ann.get("id", i)
        if ann.get("iscrowd", 0):
            out.num_crowd += 1
            return None
        out.annotations[ann_id] = (image_id, box, category_id)
        by_image.setdefault(image_id, []).append(Region(box, categories[category_id], ann_id))
        return ann_id

    read_records(top_level_list(data, path, "annotations"), file, parse_annotation, policy)
    for index, (image_id, img) in enumerate(images.items()):
        out.records.append(RegionRecord(
            file=file, index=index, image_path=os.path.join(image_dir, img["file_name"]),
            regions=by_image.get(image_id, []), image_size=(img["width"], img["height"]),
            extra={"image_id": image_id},
        ))
    return out


def unique_category_questions(instances: CocoInstances) -> list[dict]:
    """Upstream's single-round COCO grounding items (spec §4.1): for images where no category occurs
    twice, one item per object: ``{image_path, image_id, category, question "Where is the <cat>?",
    box_xyxy_abs}``."""
    items = []
    for rec in instances.records:
        names = [r.text for r in rec.regions]
        if not names or len(set(names)) != len(names):
            continue
        for region in rec.regions:
            items.append({"image_path": rec.image_path, "image_id": rec.extra["image_id"], "category": region.text,
                          "question": f"Where is the {region.text}?", "box_xyxy_abs": region.box_xyxy_abs,
                          "image_size": rec.image_size, "record_index": rec.index})
    return items
