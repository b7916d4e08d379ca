"""Flickr30K Entities in MDETR's form: ``final_flickr_separateGT_train.json`` (spec §3.5).

One entry per caption; each annotation is a box with the caption span(s) of its phrase
(``tokens_positive``). Images under ``<flickr30k_dir>/flickr30k-images/``.
"""
from __future__ import annotations

from chatterbox.data.errors import BadRecordPolicy
from chatterbox.data.readers.mdetr import read_mdetr
from chatterbox.data.records import RegionRecord


def read_flickr30k(path: str, image_dir: str, policy: BadRecordPolicy | None = None) -> list[RegionRecord]:
    return [r for r in read_mdetr(path, image_dir, 0, "tokens_positive", policy) if r.regions]
