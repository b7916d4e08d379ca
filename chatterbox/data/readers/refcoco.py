"""RefCOCO / RefCOCO+ / RefCOCOg in the refer toolkit layout (spec §4.2).

``<refer_dir>/<dataset>/refs(<split_by>).p``: a pickled list of refs ``{ref_id, ann_id, image_id,
split, category_id, file_name, sentences: [{sent, raw, tokens, sent_id}]}``; ``instances.json`` next to
it is COCO 2014 train instances (boxes xywh). split_by is "unc" for RefCOCO/RefCOCO+ (splits train /
val / testA / testB) and "umd" (or "google") for RefCOCOg (train / val / test). One `RegionRecord` per
ref: one region (the referred object) with all its sentences in ``extra["sentences"]``.
"""
from __future__ import annotations

import os

from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.readers.coco import read_coco_instances
from chatterbox.data.readers.common import display_name, load_pickle, read_records, require
from chatterbox.data.records import Region, RegionRecord

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def refs_path(refer_dir: str, dataset: str, split_by: str) -> str:
    return os.path.join(refer_dir, dataset, f"refs({split_by}).p")


def read_refer(refer_dir: str, dataset: str, split_by: str, split: str | list[str], coco2014_train_dir: str,
               policy: BadRecordPolicy | None = None) -> list[RegionRecord]:
    path = refs_path(refer_dir, dataset, split_by)
    refs = load_pickle(path)
    file = display_name(path)
    if not isinstance(refs, list):
        raise DataError(f"expected a list of refs, got {type(refs).__name__}", file)
    instances = read_coco_instances(os.path.join(refer_dir, dataset, "instances.json"), coco2014_train_dir, policy)
    splits = {split} if isinstance(split, str) else set(split)

    def parse(ref, index):
        ref_split = require(ref, "split", str, file, index)
        if ref_split not in splits:
            return None
        ann_id = require(ref, "ann_id", int, file, index)
        if ann_id not in instances.annotations:
            raise DataError(f"annotation {ann_id} is not in instances.json", file, index, "ann_id")
        image_id, box, category_id = instances.annotations[ann_id]
        sentences = require(ref, "sentences", list, file, index)
        texts = []
        for j, s in enumerate(sentences):
            sent = require(s, "sent", str, file, index, f"sentences[{j}].").strip()
            if sent:
                texts.append(sent)
        if not texts:
            raise DataError("no non-empty sentence", file, index, "sentences")
        img = instances.images[image_id]
        return RegionRecord(
            file=file, index=index, image_path=os.path.join(coco2014_train_dir, img["file_name"]),
            regions=[Region(box, texts[0], ann_id)], image_size=(img["width"], img["height"]),
            extra={"sentences": texts, "ref_id": ref.get("ref_id"), "image_id": image_id, "split": ref_split,
                   "category": instances.categories[category_id]},
        )

    return read_records(refs, file, parse, policy)
