"""Every source, read from synthetic files in the real layout, built, encoded and collated; the boxes
in the batch, converted back to pixels, must be the boxes the shapes were drawn with."""
from __future__ import annotations

import random

import pytest
import torch

from chatterbox.boxes import convert_layout, denormalize
from chatterbox.data.collate import collate_samples
from chatterbox.data.pipeline import SampleEncoder
from chatterbox.data.sources import SOURCES, build_options, load_source
from chatterbox.data.transforms import ClipGeometry
from chatterbox.tokens import special_token_ids

from data_support import scene_boxes, synthetic_data_config

EXPECTED_TASK = {name: spec.task for name, spec in SOURCES.items()}


def _recovered_region_boxes(batch, b, image_path, clip_resize, normalisation):
    height, width = batch["image_sizes_hw"][b].tolist()
    boxes = batch["region_boxes_xyxy_clip_norm"][b].double()
    if clip_resize == "squash" or normalisation == "full_image":
        return denormalize(boxes, width, height)
    return ClipGeometry.build(width, height, 224, "crop").boxes_from_clip_norm(boxes)


@pytest.mark.parametrize("source_name", sorted(SOURCES))
def test_source_round_trip(source_name, tiny_tokenizer):
    cfg = synthetic_data_config(region_box_normalisation="full_image", coco_det_augment=False)
    source = load_source(source_name, cfg)
    encoder = SampleEncoder.from_config(tiny_tokenizer, cfg)
    options = build_options(cfg)
    ids = special_token_ids(tiny_tokenizer)
    samples, built = [], []
    for index in range(min(4, len(source.records))):
        sample = source.build(index, random.Random(index), options)
        assert sample is not None
        built.append(sample)
        samples.append(encoder.encode(sample))
    batch = collate_samples(samples, tiny_tokenizer.pad_token_id)
    assert batch["task"] == [EXPECTED_TASK[source_name]] * len(samples)
    assert batch["offset"].tolist() == list(range(len(samples) + 1))
    assert batch["images_clip"].shape == (len(samples), 3, 224, 224)
    for b, sample in enumerate(built):
        true_boxes = scene_boxes(sample.image_path)
        n_bbox = int((batch["input_ids"][b] == ids.bbox).sum())
        assert n_bbox == len(batch["region_boxes_xyxy_clip_norm"][b])
        n_vg = int((batch["input_ids"][b] == ids.vg).sum())
        assert n_vg == len(batch["grounding_targets_cxcywh_norm"][b])
        recovered = _recovered_region_boxes(batch, b, sample.image_path, sample.clip_resize, "full_image")
        for box in recovered.tolist():
            assert tuple(round(v) for v in box) in true_boxes
            assert max(abs(v - round(v)) for v in box) < 1e-3
        height, width = batch["image_sizes_hw"][b].tolist()
        for target in batch["grounding_targets_cxcywh_norm"][b]:
            xyxy_abs = denormalize(convert_layout(target.double(), "cxcywh", "xyxy"), width, height)
            for box in xyxy_abs.tolist():
                assert tuple(round(v) for v in box) in true_boxes
                assert max(abs(v - round(v)) for v in box) < 1e-3
    if EXPECTED_TASK[source_name] == "grounding":
        assert batch["images_dino"].shape == (len(samples), 3, 512, 512)
        assert all(len(t) == 1 for t in batch["grounding_targets_cxcywh_norm"])
    else:
        assert batch["images_dino"] is None
        assert all(t == [] for t in batch["grounding_targets_cxcywh_norm"])
    if EXPECTED_TASK[source_name] == "referring":
        assert all(len(r) >= 1 for r in batch["region_boxes_xyxy_clip_norm"])


def test_crop_normalisation_maps_through_the_centre_crop(tiny_tokenizer):
    cfg = synthetic_data_config(region_box_normalisation="crop")
    source = load_source("cb_refcoco_ref", cfg)
    encoder = SampleEncoder.from_config(tiny_tokenizer, cfg)
    checked = 0
    for index in range(len(source.records)):
        sample = source.build(index, random.Random(0), build_options(cfg))
        enc = encoder.encode(sample)
        height, width = enc.image_size_hw
        geom = ClipGeometry.build(width, height, 224, "crop")
        (box_abs,) = [b for t in sample.turns for b in t.region_boxes_xyxy_abs]
        box_clip = torch.tensor(box_abs) * torch.tensor([geom.resized_width / width, geom.resized_height / height] * 2)
        box_clip -= torch.tensor([geom.crop_left, geom.crop_top] * 2)
        if box_clip.min() >= 0 and box_clip.max() <= 224:  # fully inside the crop: exact inverse
            back = geom.boxes_from_clip_norm(enc.region_boxes_xyxy_clip_norm.double())[0]
            assert torch.allclose(back, torch.tensor(box_abs, dtype=torch.float64), atol=1e-3)
            checked += 1
        assert enc.region_boxes_xyxy_clip_norm.min() >= 0 and enc.region_boxes_xyxy_clip_norm.max() <= 1
    assert checked > 0


def test_refer_splits_are_disjoint():
    cfg = synthetic_data_config()
    from chatterbox.data.readers.refcoco import read_refer
    import os
    image_dir = os.path.join(cfg.paths.coco2014_dir, "train2014")
    train = read_refer(cfg.paths.refer_dir, "refcocog", "umd", "train", image_dir)
    test = read_refer(cfg.paths.refer_dir, "refcocog", "umd", ["val", "test"], image_dir)
    assert train and test
    assert not {r.extra["ref_id"] for r in train} & {r.extra["ref_id"] for r in test}
    assert all(len(r.extra["sentences"]) == 2 for r in train)


def test_coco_unique_category_questions():
    from chatterbox.data.readers.coco import read_coco_instances, unique_category_questions
    cfg = synthetic_data_config()
    inst = read_coco_instances(f"{cfg.paths.coco2017_dir}/annotations/instances_val2017.json",
                               f"{cfg.paths.coco2017_dir}/val2017")
    items = unique_category_questions(inst)
    assert items and all(it["question"] == f"Where is the {it['category']}?" for it in items)
    for it in items:
        assert tuple(it["box_xyxy_abs"]) in scene_boxes(it["image_path"])


def test_coco_det_shift_flip_moves_image_and_boxes_together(tiny_tokenizer):
    """With upstream's shift/flip on, the CLIP pixel at each region box's centre still shows that shape."""
    from dataclasses import replace
    from chatterbox.data.transforms import CLIP_MEAN, CLIP_STD
    from data_support import synthetic_corpus
    cfg = synthetic_data_config(coco_det_augment=True)
    source = load_source("coco_det", cfg)
    options = replace(build_options(cfg), shift_prob=1.0, flip_prob=1.0)
    encoder = SampleEncoder.from_config(tiny_tokenizer, cfg)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    checked = 0
    for index in range(len(source.records)):
        sample = source.build(index, random.Random(index), options)
        dx, dy, flip = sample.clip_augment
        assert flip and -32 <= dx <= 32 and -32 <= dy <= 32
        enc = encoder.encode(sample)
        rgb = ((enc.image_clip * std + mean) * 255).round()
        image_id = int(sample.image_path.rsplit("/", 1)[-1].split(".")[0])
        scene = next(s for s in synthetic_corpus().scenes if s.image_id == image_id)
        for turn, box in zip(sample.turns, enc.region_boxes_xyxy_clip_norm):
            name = turn.assistant.split(" a ", 1)[1].split(" in ")[0].rstrip(".")
            shape = next(sh for sh in scene.shapes if sh.name == name)
            # the box centre is inside every drawn kind (triangles point any way, their middle is filled)
            x = int((box[0] + box[2]) / 2 * 224)
            y = int((box[1] + box[3]) / 2 * 224)
            expected = torch.tensor(shape.fill, dtype=torch.float32)
            assert (rgb[:, y, x] - expected).abs().max() < 60, (sample.sample_id, name, rgb[:, y, x])
            checked += 1
    assert checked > 10


def test_raw_visual_genome_regions_match_the_gpt4roi_file(tiny_tokenizer):
    cfg = synthetic_data_config()
    gpt4roi = load_source("vg", cfg)
    cfg.vg_annotation_format = "vg_regions"
    raw = load_source("vg", cfg)
    assert len(raw.records) == len(gpt4roi.records)
    for a, b in zip(raw.records, gpt4roi.records):
        assert [r.box_xyxy_abs for r in a.regions] == [r.box_xyxy_abs for r in b.regions]
        assert [r.text for r in a.regions] == [r.text for r in b.regions]
        for r in a.regions:
            assert tuple(r.box_xyxy_abs) in scene_boxes(a.image_path)
    sample = raw.build(0, random.Random(0), build_options(cfg))
    SampleEncoder.from_config(tiny_tokenizer, cfg).encode(sample)


def test_make_synthetic_data_cli_writes_every_layout(tmp_path):
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_synthetic_data.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "s"), "--num-images", "8", "--seed", "3"]) == 0
    root = tmp_path / "s"
    expected = ["CB-300K/CB_MRG.json", "CB-300K/CB_REF.json", "CB-300K/CB_GND.json", "CB-300K/CB_LC.json",
                "CB-materials/CB-refcoco-GND.json", "CB-materials/CB-coco-GND.json", "CB-materials/CB-refcoco-REF.json",
                "OpenSource/finetune_refcoco_train.json", "OpenSource/finetune_refcoco+_train.json",
                "OpenSource/finetune_refcocog_train.json", "OpenSource/vg_train.json",
                "OpenSource/final_flickr_separateGT_train.json", "refer/refcoco/refs(unc).p",
                "refer/refcoco+/refs(unc).p", "refer/refcocog/refs(umd).p", "refer/refcocog/instances.json",
                "MSCOCO2017/annotations/instances_train2017.json", "MSCOCO2017/annotations/instances_val2017.json",
                "VG/region_descriptions.json", "VG/image_data.json", "llava_instruct_150k.json",
                "eval/grounding_qa.json", "own_data/dialogues.jsonl", "data_paths.yaml"]
    for rel in expected:
        assert (root / rel).is_file(), rel
    assert len(list((root / "MSCOCO2014" / "train2014").glob("*.jpg"))) == 8
    assert len(list((root / "MSCOCO2017" / "val2017").glob("*.jpg"))) == 2
    # deterministic given the seed
    again = tmp_path / "t"
    module.main(["--out", str(again), "--num-images", "8", "--seed", "3"])
    for rel in expected:
        assert (root / rel).read_bytes().replace(str(root).encode(), b"") == \
            (again / rel).read_bytes().replace(str(again).encode(), b""), rel


def test_kind_questions_change_only_cb_ref_and_name_the_kind_alone(tmp_path):
    import filecmp
    import json

    from chatterbox.data.synthetic import CATEGORIES, write_corpus
    plain, asked = tmp_path / "plain", tmp_path / "asked"
    write_corpus(plain, num_images=12, seed=1)
    write_corpus(asked, num_images=12, seed=1, kind_question_share=0.5)
    kinds = {name.split()[1] for name in CATEGORIES}

    def rounds(root):
        dialogues = json.loads((root / "CB-300K" / "CB_REF.json").read_text())["data"]
        turns = [turn["value"] for d in dialogues for turn in d["conversation"]]
        return list(zip(turns[0::2], turns[1::2]))

    kind_rounds = [(q, a) for q, a in rounds(asked) if q.startswith("What shape is")]
    assert kind_rounds and not any(q.startswith("What shape is") for q, _ in rounds(plain))
    for question, answer in kind_rounds:
        assert "<object:[" in question and answer.removeprefix("It is a ").removesuffix(".") in kinds, (question, answer)
    # the boxes asked about are the same; only the kind rounds' words differ
    assert [q.split("<object:")[1] for q, _ in rounds(plain)] == [q.split("<object:")[1] for q, _ in rounds(asked)]
    for path in plain.rglob("*"):
        relative = path.relative_to(plain).as_posix()
        if path.is_file() and relative not in ("CB-300K/CB_REF.json", "data_paths.json", "data_paths.yaml"):
            assert filecmp.cmp(path, asked / relative, shallow=False), relative
