"""Visual Genome region captions as GPT4RoI/upstream read them: ``vg_train.json`` (spec §3.5, VGDATA).

COCO-style: ``images [{id, file_name, width, height}]``, ``annotations [{image_id, bbox [x, y, w, h],
caption, category_id}]``, ``categories`` where only the category named "object" is used (as upstream).
Images live under ``<vg_dir>/images/``. One `RegionRecord` per image; ``Region.text`` = the caption.
"""
from __future__ import annotations

import os

from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.readers.common import (box_to_xyxy, display_name, load_json, read_categories, read_records,
                                            require, require_image_entry, require_known, top_level_list)
from chatterbox.data.records import Region, RegionRecord


def read_vg_regions(path: str, image_dir: str, policy: BadRecordPolicy | None = None) -> list[RegionRecord]:
    data = load_json(path)
    file = display_name(path)
    categories = read_categories(data, path, file)
    images = {}

    def parse_image(img, i):
        iid = require_image_entry(img, file, f"images[{i}]")
        images[iid] = (i, img)
        return iid

    read_records(top_level_list(data, path, "images"), file, parse_image, policy)
    regions: dict[int, list[Region]] = {}

    def parse_annotation(ann, i):
        rec = f"annotations[{i}]"
        iid = require_known(ann, "image_id", images, file, rec, "image id")
        cid = require_known(ann, "category_id", categories, file, rec, "category")
        if categories[cid] != "object":
            return None
        caption = require(ann, "caption", str, file, rec).strip()
        if not caption:
            raise DataError("empty caption", file, rec, "caption")
        img = images[iid][1]
        box = box_to_xyxy(require(ann, "bbox", list, file, rec), "xywh", file, rec, "bbox", (img["width"], img["height"]))
        regions.setdefault(iid, []).append(Region(box, caption, ann.get("id", i)))
        return iid

    read_records(top_level_list(data, path, "annotations"), file, parse_annotation, policy)
    return [RegionRecord(file=file, index=i, image_path=os.path.join(image_dir, img["file_name"]),
                         regions=regions[iid], image_size=(img["width"], img["height"]))
            for iid, (i, img) in images.items() if regions.get(iid)]


def _vg_folder(url: str) -> str:
    """VG images are split over VG_100K/ and VG_100K_2/; image_data.json's url says which."""
    return "VG_100K_2" if "VG_100K_2" in url else "VG_100K"


def read_vg_region_descriptions(regions_path: str, image_data_path: str, vg_dir: str,
                                policy: BadRecordPolicy | None = None) -> list[RegionRecord]:
    """The raw Visual Genome release: ``region_descriptions.json`` (``[{"id": image_id, "regions":
    [{"region_id", "image_id", "phrase", "x", "y", "width", "height"}]}]``) with ``image_data.json``
    (``[{"image_id", "width", "height", "url"}]``) for image sizes and folders.

    Raw VG boxes sometimes extend a few pixels past the image; they are clipped to it (and counted in
    the log), since the region is still the annotated one. Boxes with no area inside the image are errors.
    """
    import logging

    log = logging.getLogger("chatterbox.data")
    info_file = display_name(image_data_path)
    sizes = {}
    for i, item in enumerate(top_level_list(load_json(image_data_path), image_data_path, None)):
        iid = require(item, "image_id", int, info_file, i)
        sizes[iid] = (require(item, "width", int, info_file, i), require(item, "height", int, info_file, i),
                      _vg_folder(item.get("url", "") or ""))
    file = display_name(regions_path)
    clipped = 0

    def parse(item, index):
        nonlocal clipped
        iid = require(item, "id", int, file, index)
        if iid not in sizes:
            raise DataError(f"image {iid} is not in {info_file}", file, index, "id")
        width, height, folder = sizes[iid]
        regions = []
        for j, reg in enumerate(require(item, "regions", list, file, index)):
            prefix = f"regions[{j}]."
            phrase = require(reg, "phrase", str, file, index, prefix).strip()
            if not phrase:
                raise DataError("empty phrase", file, index, prefix + "phrase")
            x, y, w, h = (require(reg, k, (int, float), file, index, prefix) for k in ("x", "y", "width", "height"))
            x1, y1, x2, y2 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                clipped += 1
            box = box_to_xyxy([x1, y1, x2 - x1, y2 - y1], "xywh", file, index, prefix + "x/y/width/height",
                              (width, height))
            regions.append(Region(box, phrase, reg.get("region_id", j)))
        if not regions:
            return None
        return RegionRecord(file=file, index=index, image_path=os.path.join(vg_dir, folder, f"{iid}.jpg"),
                            regions=regions, image_size=(width, height))

    items = top_level_list(load_json(regions_path), regions_path, None)
    out = read_records(items, file, parse, policy)
    if clipped:
        log.info("%s: %d region boxes extended past their image and were clipped to it", file, clipped)
    return out
