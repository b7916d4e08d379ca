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
    jsonl_files: list[str] = field(default_factory=list)  # your own dialogues (readers/jsonl.py)


@dataclass
class ReferConfig:
    dataset: str = "refcocog"  # refcoco | refcoco+ | refcocog
    split_by: str = "umd"  # unc (refcoco, refcoco+) | umd / google (refcocog)
    split: list[str] = field(default_factory=lambda: ["train"])


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
    clip_patch_size: int = 14  # with clip_image_size: (224 / 14)^2 = 256 <im_patch> positions per image
    # "per_source": each source's own CLIP preprocessing (upstream); "squash": every image (model.clip.resize)
    clip_resize: Literal["per_source", "squash"] = "per_source"
    dino_image_size: int = 512
    max_length: int = 2048
    # Region (<bbox>) boxes given to the model are xyxy normalised to the CLIP input. "crop": mapped
    # through the resize/centre-crop CLIP actually sees (correct); "full_image": divided by the uncropped
    # image size, as upstream does for CB-300K data (misaligned on non-square images, spec §5.2 item 8).
    region_box_normalisation: Literal["crop", "full_image"] = "crop"
    num_workers: int = 4
    bad_record_policy: Literal["error", "skip-and-count"] = "error"
    max_skipped_records: int = 1000
    # Prompt details (spec §3.2, §5.2 item 12): upstream opens the first human message with
    # "<image>\n " in training; [VG] follows the question after vg_separator (" " = the eval prompt form).
    image_prompt_prefix: str = "<image>\n "
    vg_separator: str = " "
    # CB-GND / CB-LC grounding samples: "first" single-box answer gets [VG] (upstream), or "all" of them
    # (several queries about one image per sample: more grounding supervision per LLM pass).
    grounding_rounds: Literal["first", "all"] = "first"
    # CB-MRG: probability that a single-box question names its object as "the region <bbox>".
    region_name_replace_prob: float = 0.3
    # COCO detection (coco_det): upstream's mmdet RandomShift(p=0.5, +-32 px) + RandomFlip(p=0.5).
    coco_det_augment: bool = True
    # RefCOCO-family MDETR entries with fewer caption words are not used (upstream: 3).
    min_caption_words: int = 3
    # Source of the "vg" referring regions: upstream's GPT4RoI file (opensource_dir/vg_train.json) or the
    # raw Visual Genome release (vg_dir/region_descriptions.json + image_data.json).
    vg_annotation_format: Literal["gpt4roi", "vg_regions"] = "gpt4roi"
    # VGDATA images live under <vg_dir>/<vg_region_images_subdir>/.
    vg_region_images_subdir: str = "images"
    # COCO instances split used by coco_det / coco_instances_gnd (annotations/instances_<split>.json).
    coco_instances_split: str = "train2017"
    # refer-toolkit sources (refer_rec / refer_reg): which dataset, split scheme and split(s).
    refer: ReferConfig = field(default_factory=lambda: ReferConfig())
    # When to redraw instead of failing: a record a builder cannot use (e.g. every box too small) is
    # redrawn at most this many times in a row before the stream gives up.
    max_redraws: int = 100

    @property
    def num_image_patches(self) -> int:
        """`<im_patch>` positions per image: one per CLIP patch."""
        return (self.clip_image_size // self.clip_patch_size) ** 2
