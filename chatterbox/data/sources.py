"""The named data sources of the mixtures: which reader, which dialogue builder, which files.

Mixture keys in `DataConfig` ({grounding,referring,vqa}_mixture) name sources from `SOURCES`. A source
with weight > 0 whose folder is not configured is an error naming the missing ``data.paths`` key.

| source | task | file (under its configured folder) | builder |
|---|---|---|---|
| cb_refcoco_gnd | grounding | CB-materials/CB-refcoco-GND.json (COCO 2014 train) | first round |
| cb_coco_gnd | grounding | CB-materials/CB-coco-GND.json (COCO 2017 train) | first round |
| cb_gnd | grounding | CB-300K/CB_GND.json (VG) | random start, first single-box answer |
| cb_lc_gnd | grounding | CB-300K/CB_LC.json (VG) | first single-box answer, [it] -> it |
| coco_instances_gnd | grounding | MSCOCO2017/annotations/instances_train2017.json | "Where is the <category>?" |
| refer_rec | grounding | refer/<dataset>/refs(<split_by>).p + instances.json | "Where is <sentence>?" |
| cb_mrg | referring | CB-300K/CB_MRG.json | JackVanilla |
| cb_ref | referring | CB-300K/CB_REF.json | JackReferring |
| cb_refcoco_ref | referring | CB-materials/CB-refcoco-REF.json | JackReferring (xywh) |
| coco_det | referring | MSCOCO2017/annotations/instances_train2017.json | CocoDet |
| refcoco, refcoco+, refcocog | referring | OpenSource/finetune_refcoco{,+,g}_train.json | RefCOCO family |
| vg | referring | OpenSource/vg_train.json (VG/images), or VG/region_descriptions.json + image_data.json | VGDATA |
| flickr30k | referring | OpenSource/final_flickr_separateGT_train.json | Flickr30k |
| refer_reg | referring | refer/<dataset>/refs(<split_by>).p + instances.json | "What is it <bbox>?" |
| cb_lc_vqa, cb_mrg_vqa | vqa | CB-300K/CB_LC.json, CB_MRG.json | whole conversation |
| llava | vqa | llava_instruct_150k.json (COCO 2017 train) | verbatim |
| jsonl_gnd, jsonl_ref, jsonl_vqa | grounding, referring, vqa | your own data: data.paths.jsonl_files | as written |
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from chatterbox.data import dialogues as D
from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.readers.cb300k import read_cb300k
from chatterbox.data.readers.cb_materials import read_cb_materials
from chatterbox.data.readers.coco import read_coco_instances
from chatterbox.data.readers.flickr30k import read_flickr30k
from chatterbox.data.readers.jsonl import read_jsonl_files
from chatterbox.data.readers.llava import read_llava
from chatterbox.data.readers.mdetr import read_mdetr
from chatterbox.data.readers.refcoco import read_refer
from chatterbox.data.readers.vg import read_vg_region_descriptions, read_vg_regions
from chatterbox.data.records import Sample

logger = logging.getLogger("chatterbox.data")


@dataclass
class SourceSpec:
    name: str
    task: str
    needs: tuple[str, ...]  # DataConfig.paths keys that must be set
    read: Callable[[Any, BadRecordPolicy], tuple[list, dict]]  # (data cfg, policy) -> (records, context)
    build: Callable[[Any, random.Random, D.BuildOptions, dict], Sample | None]
    eligible: Callable[[Any], bool] = lambda record: True


@dataclass
class LoadedSource:
    # The spec is looked up by name so that a LoadedSource pickles (DataLoader workers under "spawn").
    name: str
    records: list
    context: dict = field(default_factory=dict)
    num_read: int = 0  # records parsed before the eligibility filter

    @property
    def spec(self) -> SourceSpec:
        return SOURCES[self.name]

    def build(self, index: int, rng: random.Random, options: D.BuildOptions) -> Sample | None:
        return self.spec.build(self.records[index], rng, options, self.context)


def _p(cfg, key: str) -> str:
    return getattr(cfg.paths, key)


def _cb(part):
    return lambda cfg, pol: (read_cb300k(_p(cfg, "cb300k_dir"), part, _p(cfg, "vg_dir"), pol), {})


def _materials(part):
    return lambda cfg, pol: (read_cb_materials(_p(cfg, "cb_materials_dir"), part, _p(cfg, "coco2014_dir"),
                                               _p(cfg, "coco2017_dir"), pol), {})


def _coco_train(cfg, pol):
    split = cfg.coco_instances_split
    inst = read_coco_instances(os.path.join(_p(cfg, "coco2017_dir"), "annotations", f"instances_{split}.json"),
                               os.path.join(_p(cfg, "coco2017_dir"), split), pol)
    return inst.records, {"class_names": [inst.categories[k] for k in sorted(inst.categories)]}


def _refer(cfg, pol):
    r = cfg.refer
    return read_refer(_p(cfg, "refer_dir"), r.dataset, r.split_by, r.split,
                      os.path.join(_p(cfg, "coco2014_dir"), "train2014"), pol), {}


def _mdetr(name):
    def read(cfg, pol):
        path = os.path.join(_p(cfg, "opensource_dir"), f"finetune_{name}_train.json")
        return read_mdetr(path, os.path.join(_p(cfg, "coco2014_dir"), "train2014"), cfg.min_caption_words,
                          "caption", pol), {}
    return read


def _vg(cfg, pol):
    if cfg.vg_annotation_format == "vg_regions":
        vg = _p(cfg, "vg_dir")
        return read_vg_region_descriptions(os.path.join(vg, "region_descriptions.json"),
                                           os.path.join(vg, "image_data.json"), vg, pol), {}
    return read_vg_regions(os.path.join(_p(cfg, "opensource_dir"), "vg_train.json"),
                           os.path.join(_p(cfg, "vg_dir"), cfg.vg_region_images_subdir), pol), {}


def _flickr(cfg, pol):
    return read_flickr30k(os.path.join(_p(cfg, "opensource_dir"), "final_flickr_separateGT_train.json"),
                          os.path.join(_p(cfg, "flickr30k_dir"), "flickr30k-images"), pol), {}


def _llava(cfg, pol):
    return read_llava(_p(cfg, "llava_instruct_json"), os.path.join(_p(cfg, "coco2017_dir"), "train2017"), pol), {}


def _jsonl(cfg, pol):
    return read_jsonl_files(_p(cfg, "jsonl_files"), pol), {}


_CB = ("cb300k_dir", "vg_dir")
_MAT14 = ("cb_materials_dir", "coco2014_dir")

SOURCES: dict[str, SourceSpec] = {s.name: s for s in [
    SourceSpec("cb_refcoco_gnd", "grounding", _MAT14, _materials("refcoco_gnd"),
               lambda r, g, o, c: D.build_first_round_grounding(r, g, o), D.first_round_grounding_eligible),
    SourceSpec("cb_coco_gnd", "grounding", ("cb_materials_dir", "coco2017_dir"), _materials("coco_gnd"),
               lambda r, g, o, c: D.build_first_round_grounding(r, g, o), D.first_round_grounding_eligible),
    SourceSpec("cb_gnd", "grounding", _CB, _cb("gnd"),
               lambda r, g, o, c: D.build_chain_grounding(r, g, o, logic=False), D.chain_grounding_eligible),
    SourceSpec("cb_lc_gnd", "grounding", _CB, _cb("lc"),
               lambda r, g, o, c: D.build_chain_grounding(r, g, o, logic=True), D.chain_grounding_eligible),
    SourceSpec("coco_instances_gnd", "grounding", ("coco2017_dir",), _coco_train,
               lambda r, g, o, c: D.build_region_grounding(r, g, o),
               lambda r: any([x.text for x in r.regions].count(x.text) == 1 for x in r.regions)),
    SourceSpec("refer_rec", "grounding", ("refer_dir", "coco2014_dir"), _refer,
               lambda r, g, o, c: D.build_region_grounding(r, g, o), D.regions_eligible),
    SourceSpec("cb_mrg", "referring", _CB, _cb("mrg"),
               lambda r, g, o, c: D.build_cb_referring(r, g, o, allow_name_replace=True),
               lambda r: D.cb_referring_eligible(r, True)),
    SourceSpec("cb_ref", "referring", _CB, _cb("ref"),
               lambda r, g, o, c: D.build_cb_referring(r, g, o, allow_name_replace=False),
               lambda r: D.cb_referring_eligible(r, False)),
    SourceSpec("cb_refcoco_ref", "referring", _MAT14, _materials("refcoco_ref"),
               lambda r, g, o, c: D.build_cb_referring(r, g, o, allow_name_replace=False),
               lambda r: D.cb_referring_eligible(r, False)),
    SourceSpec("coco_det", "referring", ("coco2017_dir",), _coco_train,
               lambda r, g, o, c: D.build_coco_det(r, g, o, c["class_names"]), D.regions_eligible),
    *[SourceSpec(n, "referring", ("opensource_dir", "coco2014_dir"), _mdetr(n),
                 (lambda name: lambda r, g, o, c: D.build_refcoco_family(r, g, o, name))(n), D.regions_eligible)
      for n in ("refcoco", "refcoco+", "refcocog")],
    SourceSpec("vg", "referring", ("opensource_dir", "vg_dir"), _vg,
               lambda r, g, o, c: D.build_vg(r, g, o), D.regions_eligible),
    SourceSpec("flickr30k", "referring", ("opensource_dir", "flickr30k_dir"), _flickr,
               lambda r, g, o, c: D.build_flickr30k(r, g, o), D.regions_eligible),
    SourceSpec("refer_reg", "referring", ("refer_dir", "coco2014_dir"), _refer,
               lambda r, g, o, c: D.build_refer_reg(r, g, o), D.regions_eligible),
    SourceSpec("cb_lc_vqa", "vqa", _CB, _cb("lc"), lambda r, g, o, c: D.build_cb_vqa(r, g, o, logic=True),
               lambda r: bool(r.turns and r.turns[0].question)),
    SourceSpec("cb_mrg_vqa", "vqa", _CB, _cb("mrg"), lambda r, g, o, c: D.build_cb_vqa(r, g, o, logic=False),
               lambda r: bool(r.turns and r.turns[0].question)),
    SourceSpec("llava", "vqa", ("llava_instruct_json", "coco2017_dir"), _llava,
               lambda r, g, o, c: D.build_llava(r, g, o)),
    SourceSpec("jsonl_gnd", "grounding", ("jsonl_files",), _jsonl,
               lambda r, g, o, c: D.build_jsonl(r, g, o, "grounding"), D.jsonl_grounding_eligible),
    SourceSpec("jsonl_ref", "referring", ("jsonl_files",), _jsonl,
               lambda r, g, o, c: D.build_jsonl(r, g, o, "referring"), D.jsonl_referring_eligible),
    SourceSpec("jsonl_vqa", "vqa", ("jsonl_files",), _jsonl,
               lambda r, g, o, c: D.build_jsonl(r, g, o, "vqa"), D.jsonl_vqa_eligible),
]}


def build_options(data_cfg) -> D.BuildOptions:
    return D.BuildOptions(image_prefix=data_cfg.image_prompt_prefix, vg_separator=data_cfg.vg_separator,
                          grounding_rounds=data_cfg.grounding_rounds,
                          region_name_replace_prob=data_cfg.region_name_replace_prob,
                          clip_size=data_cfg.clip_image_size, coco_det_augment=data_cfg.coco_det_augment)


def load_source(name: str, data_cfg, policy: BadRecordPolicy | None = None, task: str | None = None) -> LoadedSource:
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; known: {sorted(SOURCES)}", "<config>", None, "data mixture")
    spec = SOURCES[name]
    if task is not None and spec.task != task:
        raise DataError(f"source {name!r} is a {spec.task} source, not {task}", "<config>", None, f"data.{task}_mixture")
    missing = [k for k in spec.needs if not getattr(data_cfg.paths, k)]
    if missing:
        raise DataError(f"source {name!r} needs data.paths.{', data.paths.'.join(missing)} to be set",
                        "<config>", None, f"data.paths.{missing[0]}")
    records, context = spec.read(data_cfg, policy or BadRecordPolicy())
    eligible = [r for r in records if spec.eligible(r)]
    if len(eligible) < len(records):
        logger.info("source %s: %d of %d records have nothing this source can use (e.g. no single-box answer); "
                    "not drawn", name, len(records) - len(eligible), len(records))
    if not eligible:
        raise DataError(f"source {name!r} has no usable record ({len(records)} read)", "<config>", None, name)
    return LoadedSource(name, eligible, context, len(records))
