"""Your own data in ChatterBox's JSONL format (readers/jsonl.py): the synthetic corpus's example file becomes
the training samples it describes, a stage-2 config listing it builds all three streams, and every bad record
or config value is one error line naming file, line and field."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import yaml

from chatterbox.boxes import convert_layout, denormalize
from chatterbox.config import CONFIG_DIR, ConfigError, load_config
from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.pipeline import SampleEncoder
from chatterbox.data.readers.jsonl import read_jsonl
from chatterbox.data.sources import build_options, load_source
from chatterbox.data.streams import TASKS, build_stream

from data_support import synthetic_corpus, synthetic_data_config

SOURCE_OF_TASK = {"grounding": "jsonl_gnd", "referring": "jsonl_ref", "vqa": "jsonl_vqa"}


def _example_lines() -> list[dict]:
    return [json.loads(line) for line in synthetic_corpus().jsonl_example.read_text().splitlines()]


def _recovered_boxes_xyxy_abs(encoded) -> tuple[list, list]:
    height, width = encoded.image_size_hw
    regions = denormalize(encoded.region_boxes_xyxy_clip_norm.double(), width, height)
    targets = [denormalize(convert_layout(t.double(), "cxcywh", "xyxy"), width, height)
               for t in encoded.grounding_targets_cxcywh_norm]
    return regions, targets


@pytest.mark.parametrize("task", TASKS)
def test_the_example_file_becomes_the_samples_it_describes(task, tiny_tokenizer):
    cfg = synthetic_data_config(region_box_normalisation="full_image")
    lines = _example_lines()
    source = load_source(SOURCE_OF_TASK[task], cfg, task=task)
    has_vg = [any("[VG]" in r["question"] for r in line["rounds"]) for line in lines]
    has_bbox = [any("<bbox>" in r["question"] for r in line["rounds"]) for line in lines]
    drawn = {"grounding": has_vg, "referring": has_bbox, "vqa": [not b for b in has_bbox]}[task]
    assert [r.index for r in source.records] == [n for n, used in enumerate(drawn, 1) if used]
    encoder = SampleEncoder.from_config(tiny_tokenizer, cfg)
    for index, record in enumerate(source.records):
        written = lines[record.index - 1]
        sample = source.build(index, random.Random(index), build_options(cfg))
        assert sample.task == task and sample.sample_id == f"own_data/dialogues.jsonl#{record.index}"
        assert Path(sample.image_path) == synthetic_corpus().jsonl_example.parent / written["image"]
        assert len(sample.turns) == len(written["rounds"])
        for k, (turn, round_) in enumerate(zip(sample.turns, written["rounds"])):
            question = round_["question"] if task == "grounding" else round_["question"].replace(" [VG]", "")
            assert turn.user == (cfg.image_prompt_prefix if k == 0 else "") + question
            assert turn.assistant == round_["answer"]
            assert turn.region_boxes_xyxy_abs == [tuple(b) for b in round_.get("region_boxes_xyxy_abs", [])]
            targets = round_.get("grounding_boxes_xyxy_abs") if task == "grounding" else None
            assert turn.grounding_boxes_xyxy_abs == (None if targets is None else [tuple(b) for b in targets])
        regions, targets = _recovered_boxes_xyxy_abs(encoder.encode(sample))
        written_regions = [b for r in written["rounds"] for b in r.get("region_boxes_xyxy_abs", [])]
        assert torch.allclose(regions, torch.tensor(written_regions, dtype=torch.float64).reshape(-1, 4), atol=1e-3)
        written_targets = [r["grounding_boxes_xyxy_abs"] for r in written["rounds"] if "[VG]" in r["question"]]
        assert len(targets) == (len(written_targets) if task == "grounding" else 0)
        for found, boxes in zip(targets, written_targets):
            assert torch.allclose(found, torch.tensor(boxes, dtype=torch.float64), atol=1e-3)


def test_a_stage2_config_listing_the_example_builds_every_stream(tmp_path, tiny_tokenizer):
    corpus = synthetic_corpus()
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(CONFIG_DIR / "tiny_stage2.yaml"),
        "data": {"paths": {**corpus.data_paths(), "jsonl_files": [str(corpus.jsonl_example)]},
                 "grounding_mixture": {"cb_gnd": 1, "jsonl_gnd": 1},
                 "referring_mixture": {"cb_ref": 1, "jsonl_ref": 1},
                 "vqa_mixture": {"llava": 1, "jsonl_vqa": 1}}}))
    cfg = load_config(config)
    for task in TASKS:
        stream = build_stream(cfg.data, task, tiny_tokenizer, batch_size=8, seed=0, num_workers=0)
        sample_ids = [sid for _ in range(2) for sid in next(stream)["sample_ids"]]
        ours = [sid for sid in sample_ids if sid.startswith("own_data/dialogues.jsonl#")]
        assert 0 < len(ours) < len(sample_ids), (task, sample_ids)


def test_wrong_config_for_the_jsonl_sources_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"data.paths.jsonl_files: expected a list"):
        load_config("tiny_stage2", ["data.paths.jsonl_files=mine.jsonl"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.paths.jsonl_file'.*jsonl_files"):
        load_config("tiny_stage2", ["data.paths.jsonl_file=[mine.jsonl]"])
    cfg = synthetic_data_config()
    with pytest.raises(DataError, match=r"source 'jsonl_gnd' is a grounding source, not referring"):
        load_source("jsonl_gnd", cfg, task="referring")
    cfg.paths.jsonl_files = []
    with pytest.raises(DataError, match=r"needs data.paths.jsonl_files to be set"):
        load_source("jsonl_ref", cfg, task="referring")
    cfg.paths.jsonl_files = ["/nonexistent/mine.jsonl"]
    with pytest.raises(DataError, match=r"/nonexistent/mine.jsonl: file not found"):
        load_source("jsonl_ref", cfg, task="referring")


def _image() -> str:
    """A real image of at least 128x128 pixels (every synthetic scene is)."""
    scene = synthetic_corpus().scenes[0]
    return str(synthetic_corpus().root / "VG" / "VG_100K" / f"{scene.image_id}.jpg")


def _round(**changes) -> dict:
    round_ = {"question": "What is <bbox> next to? [VG]", "answer": "A cup.",
              "region_boxes_xyxy_abs": [[10, 10, 50, 60]], "grounding_boxes_xyxy_abs": [[60, 10, 90, 40]]}
    round_.update(changes)
    return {k: v for k, v in round_.items() if v is not None}


def _record(**changes) -> dict:
    record = {"id": "mine-1", "image": _image(), "rounds": [_round()]}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


def _write(tmp_path: Path, *lines) -> str:
    path = tmp_path / "dialogues.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return str(path)


BAD_LINES = [
    (b'{"image": "a.jpg",, }', None, "malformed JSON at line 2 column 19"),
    (b'{"image": "caf\xe9.jpg"}', None, "not UTF-8 text"),
    ([_record()], None, "expected an object, got list"),
    (_record(image=None), "image", "missing"),
    (_record(image="nowhere.jpg"), "image", "image file not found"),
    (_record(imgae_wh=[100, 80]), "imgae_wh", "unknown field"),
    (_record(image_wh=[0, 80]), "image_wh", "positive integers"),
    (_record(rounds=[]), "rounds", "empty dialogue"),
    (_record(rounds="What is it?"), "rounds", "expected list"),
    (_record(rounds=["What is it?"]), "rounds[0]", "expected an object"),
    (_record(rounds=[_round(answer=None)]), "rounds[0].answer", "missing"),
    (_record(rounds=[_round(boxes=[[1, 1, 5, 5]])]), "rounds[0].boxes", "unknown field"),
    (_record(rounds=[_round(region_boxes_xyxy_abs=[[50, 10, 10, 60]])]), "rounds[0].region_boxes_xyxy_abs[0]",
     "zero or negative size"),
    (_record(rounds=[_round(grounding_boxes_xyxy_abs=[[60, 10, 90, 40], [5, 5, 5, 9]])]),
     "rounds[0].grounding_boxes_xyxy_abs[1]", "zero or negative size"),
    (_record(rounds=[_round(region_boxes_xyxy_abs=[[1, 2, 3]])]), "rounds[0].region_boxes_xyxy_abs[0]",
     "expected 4 numbers"),
    (_record(rounds=[_round(region_boxes_xyxy_abs=[[float("nan"), 2, 3, 4]])]),
     "rounds[0].region_boxes_xyxy_abs[0]", "non-finite"),
    (_record(rounds=[_round(region_boxes_xyxy_abs=[1, 2, 3, 4])]), "rounds[0].region_boxes_xyxy_abs[0]",
     "expected 4 numbers"),
    (_record(image_wh=[100, 80], rounds=[_round(grounding_boxes_xyxy_abs=[[60, 10, 120, 40]])]),
     "rounds[0].grounding_boxes_xyxy_abs[0]", "outside the 100x80 image"),
    (_record(rounds=[_round(question="Is <bbox> next to <bbox>? [VG]")]), "rounds[0].region_boxes_xyxy_abs",
     "2 <bbox> in the question but 1 box(es)"),
    (_record(rounds=[_round(question="What is next to it? [VG]")]), "rounds[0].region_boxes_xyxy_abs",
     "0 <bbox> in the question but 1 box(es)"),
    (_record(rounds=[_round(grounding_boxes_xyxy_abs=[])]), "rounds[0].grounding_boxes_xyxy_abs",
     "1 [VG] in the question but 0 box(es)"),
    (_record(rounds=[_round(question="What is <bbox> next to?")]), "rounds[0].grounding_boxes_xyxy_abs",
     "0 [VG] in the question but 1 box(es)"),
    (_record(rounds=[_round(question="What is <bbox>? [VG] And that? [VG]")]), "rounds[0].question",
     "at most one"),
    (_record(rounds=[_round(question="<image>\nWhat is <bbox> next to? [VG]")]), "rounds[0].question",
     "contains <image>"),
    (_record(rounds=[_round(question="[VG]", region_boxes_xyxy_abs=None)]), "rounds[0].question", "empty question"),
    (_record(rounds=[_round(answer="Here: [VG]")]), "rounds[0].answer", "answers are plain text"),
    (_record(rounds=[_round(answer=" ")]), "rounds[0].answer", "empty answer"),
]


@pytest.mark.parametrize("line, field, message", BAD_LINES)
def test_a_bad_record_is_one_line_naming_file_line_and_field(tmp_path, line, field, message):
    path = _write(tmp_path, _record(), line)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    error = info.value
    assert error.file.endswith("/dialogues.jsonl") and error.record == 2 and error.field == field
    assert message in str(error) and "\n" not in str(error)
    assert str(error).startswith(f"{error.file} record 2" + (f" field '{field}'" if field else "") + ":")


def test_skip_and_count_reads_the_good_lines_and_counts_each_bad_one(tmp_path, caplog):
    bad = [line for line, _, _ in BAD_LINES]
    path = _write(tmp_path, _record(), *bad, _record())
    policy = BadRecordPolicy("skip-and-count", max_skipped_records=len(bad))
    with caplog.at_level(logging.WARNING, logger="chatterbox.data"):
        records = read_jsonl(path, policy)
    assert [r.index for r in records] == [1, len(bad) + 2]
    assert policy.skipped == len(bad) == sum("skipped bad record" in r.message for r in caplog.records)


def test_records_are_numbered_by_line_and_images_resolve_beside_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(Path(_image()).read_bytes())
    path = tmp_path / "dialogues.jsonl"
    path.write_bytes(json.dumps(_record(image="images/a.jpg")).encode() + b"\r\n\r\n  \n"
                     + json.dumps(_record()).encode())
    records = read_jsonl(str(path))
    assert [r.index for r in records] == [1, 4]
    assert records[0].image_path == str(tmp_path / "images" / "a.jpg")


def test_what_is_checked_against_the_loaded_image_names_the_line(tiny_tokenizer, tmp_path):
    """Without image_wh a box outside the image shows when the image is loaded; a dialogue whose first round
    does not fit in max_length cannot be cut to fit."""
    outside = _record(rounds=[_round(grounding_boxes_xyxy_abs=[[60, 10, 4000, 40]])])
    long_question = "What is <bbox> next to " + "and next to that " * 200 + "? [VG]"
    cfg = synthetic_data_config()
    cfg.paths.jsonl_files = [_write(tmp_path, outside, _record(rounds=[_round(question=long_question)]))]
    source = load_source("jsonl_gnd", cfg, task="grounding")
    assert [r.index for r in source.records] == [1, 2]
    encoder = SampleEncoder(tiny_tokenizer, max_length=400)
    with pytest.raises(DataError, match=r"dialogues.jsonl record 1 field 'grounding boxes': .*outside the"):
        encoder.encode(source.build(0, random.Random(0), build_options(cfg)))
    with pytest.raises(DataError, match=r"dialogues.jsonl record 2 field 'conversation': the first round alone"):
        encoder.encode(source.build(1, random.Random(0), build_options(cfg)))
