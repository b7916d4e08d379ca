"""MDETR-style COCO json: ``finetune_refcoco{,+,g}_train.json`` and ``final_flickr_separateGT_train.json``.

Layout: ``images`` are caption entries ``{id, file_name, height, width, caption, ...}`` (several
entries may share one image file), ``annotations`` ``{id, image_id (= entry id), bbox [x, y, w, h],
category_id, tokens_positive [[start, end], ...]}``. One `RegionRecord` per entry: its caption, its
boxes and, per box, the caption span(s) it grounds (``Region.text``: the first ``tokens_positive``
span, or the whole caption when there is none).
"""
from __future__ import annotations

import logging
import os

from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.readers.common import (box_to_xyxy, display_name, load_json, read_records, require,
                                            require_image_entry, require_known, top_level_list)
from chatterbox.data.records import Region, RegionRecord


def read_mdetr(path: str, image_dir: str, min_caption_words: int = 0, text_from: str = "caption",
               policy: BadRecordPolicy | None = None) -> list[RegionRecord]:
    """``text_from``: "caption" (RefCOCO family: every box is described by the entry caption) or
    "tokens_positive" (Flickr30K: each box by its phrase). Entries whose caption has fewer than
    ``min_caption_words`` words are left out (upstream: 3 for RefCOCO/+/g); their number is logged."""
    data = load_json(path)
    file = display_name(path)
    entries = {}

    def parse_entry(img, i):
        rec = f"images[{i}]"
        eid = require_image_entry(img, file, rec)
        caption = require(img, "caption", str, file, rec)
        if not caption.strip():
            raise DataError("empty caption", file, rec, "caption")
        entries[eid] = (i, img)
        return eid

    read_records(top_level_list(data, path, "images"), file, parse_entry, policy)
    regions: dict[int, list[Region]] = {}

    def parse_annotation(ann, i):
        rec = f"annotations[{i}]"
        eid = require_known(ann, "image_id", entries, file, rec, "image id")
        img = entries[eid][1]
        box = box_to_xyxy(require(ann, "bbox", list, file, rec), "xywh", file, rec, "bbox", (img["width"], img["height"]))
        text = img["caption"]
        if text_from == "tokens_positive":
            spans = require(ann, "tokens_positive", list, file, rec)
            if not spans or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s)
                                    and 0 <= s[0] < s[1] <= len(text) for s in spans):
                raise DataError(f"expected [[start, end], ...] inside the caption, got {spans!r:.80}", file, rec,
                                "tokens_positive")
            text = text[spans[0][0]: spans[0][1]]
        regions.setdefault(eid, []).append(Region(box, text.strip(), ann.get("id", i)))
        return eid

    read_records(top_level_list(data, path, "annotations"), file, parse_annotation, policy)
    out, short = [], 0
    for eid, (i, img) in entries.items():
        if len(img["caption"].split()) < min_caption_words:
            short += 1
            continue
        out.append(RegionRecord(file=file, index=i, image_path=os.path.join(image_dir, img["file_name"]),
                                regions=regions.get(eid, []), image_size=(img["width"], img["height"]),
                                caption=img["caption"].strip(), extra={"entry_id": eid}))
    if short:
        logging.getLogger("chatterbox.data").info("%s: %d entries with captions under %d words not used", file,
                                                  short, min_caption_words)
    return out
