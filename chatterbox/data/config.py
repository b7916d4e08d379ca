"""Data config: dataset locations, stream mixtures, image sizes and the bad-record policy.

Weights are upstream's effective mixtures (spec/upstream.md §3.4-3.6); the stage-2 cadence of the
three streams lives in the training config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DatasetPaths:
    """Where each upstream source lives on disk. Empty = not available (its mixture weight must be 0)."""

    cb300k_dir: str = ""  # CB_MRG.json, CB_REF.json, CB_GND.json, CB_LC.json
    cb_materials_dir: str = ""  # CB-refcoco-GND.json, CB-coco-GND.json, CB-refcoco-REF.json
    opensource_dir: str = ""  # finetune_refcoco{,+,g}_train.json, vg_train.json, final_flickr_separateGT_train.json
    refer_dir: str = ""  # refer toolkit layout: <refer_dir>/<dataset>/refs(<split_by>).p + instances.json
    coco2014_dir: str = ""  # train2014/
    coco2017_dir: str = ""  # train2017/, val2017/, annotations/
    vg_dir: str = ""  # VG_100K/, VG_100K_2/ (and images/ for VGDATA)
    flickr30k_dir: str = ""  # flickr30k-images/
    llava_instruct_json: str = ""  # llava_instruct_150k.json


@dataclass
class DataConfig:
    paths: DatasetPaths = field(default_factory=DatasetPaths)
    grounding_mixture: dict[str, float] = field(
        default_factory=lambda: {"cb_refcoco_gnd": 5, "cb_coco_gnd": 8, "cb_gnd": 1, "cb_lc_gnd": 1}
    )
    referring_mixture: dict[str, float] = field(
        default_factory=lambda: {
            "cb_mrg": 3, "cb_ref": 2, "cb_refcoco_ref": 3, "coco_det": 1,
            "refcoco": 1, "refcoco+": 1, "refcocog": 1, "vg": 1, "flickr30k": 1,
        }
    )
    vqa_mixture: dict[str, float] = field(default_factory=lambda: {"cb_lc_vqa": 2, "cb_mrg_vqa": 1, "llava": 7})
    clip_image_size: int = 224
    dino_image_size: int = 512
    max_length: int = 2048
    # Region (<bbox>) boxes given to the model are xyxy normalised to the CLIP input. "crop": mapped
    # through the resize/centre-crop CLIP actually sees (correct); "full_image": divided by the uncropped
    # image size, as upstream does for CB-300K data (misaligned on non-square images, spec §5.2 item 8).
    region_box_normalisation: Literal["crop", "full_image"] = "crop"
    num_workers: int = 4
    bad_record_policy: Literal["error", "skip-and-count"] = "error"
    max_skipped_records: int = 1000
