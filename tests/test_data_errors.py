"""Every documented bad-input case raises DataError naming file, record and field; skip-and-count
counts and is bounded."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from chatterbox.data.errors import BadRecordPolicy, DataError, TooManyBadRecords
from chatterbox.data.pipeline import SampleEncoder
from chatterbox.data.readers.cb300k import read_conversation_file
from chatterbox.data.readers.coco import read_coco_instances
from chatterbox.data.readers.llava import read_llava
from chatterbox.data.records import Sample, Turn

from data_support import synthetic_corpus


def _cb_file(tmp_path: Path, records) -> str:
    path = tmp_path / "CB_GND.json"
    path.write_text(json.dumps({"data": records}))
    return str(path)


def _record(question="Where is the dog?", answer="Here. <dog:[10, 10, 50, 60]>", **extra):
    return {"image": "VG_100K/1.jpg", "conversation": [{"from": "human", "value": question},
                                                        {"from": "gpt", "value": answer}], **extra}


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "CB_GND.json"
    path.write_text('{"data": [{"image": "a.jpg",, }]}')
    with pytest.raises(DataError, match=r"CB_GND.json: malformed JSON at line 1 column \d+"):
        read_conversation_file(str(path), str(tmp_path))
    with pytest.raises(DataError, match="file not found"):
        read_conversation_file(str(tmp_path / "missing.json"), str(tmp_path))


@pytest.mark.parametrize("record, field, message", [
    (_record(answer="Here. <dog:[10, 10, 10, 60]>"), "conversation[1].value", "zero or negative size"),
    (_record(answer="Here. <dog:[50, 10, 10, 60]>"), "conversation[1].value", "zero or negative size"),
    (_record(answer="Here. <dog:[10, 10, 900, 60]>", image_wh=[100, 100]), "conversation[1].value", "outside"),
    (_record(answer="Here. <dog:[nan, 10, 50, 60]>"), "conversation[1].value", "malformed box group"),
    (_record(answer="Here. <dog:[10, 10, 50]>"), "conversation[1].value", "malformed box group"),
    ({"image": "a.jpg", "conversation": []}, "conversation", "empty dialogue"),
    ({"image": "a.jpg", "conversation": [{"from": "human", "value": "hi"}]}, "conversation", "odd number"),
    ({"conversation": []}, "image", "missing"),
    (_record(question="<dog:[1, 1, 5, 5]>", answer=""), "conversation[1].value", "empty message"),
    ({"image": "a.jpg", "conversation": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "conversation[0].from", "expected 'human'"),
])
def test_bad_cb_records(tmp_path, record, field, message):
    path = _cb_file(tmp_path, [_record(), record])
    with pytest.raises(DataError) as info:
        read_conversation_file(path, str(tmp_path))
    err = info.value
    assert err.file.endswith("CB_GND.json") and err.record == 1 and err.field == field
    assert message in str(err)
    assert f"record 1 field '{field}'" in str(err)


def test_unknown_category_and_bad_coco_box(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 80}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
                            {"id": 6, "image_id": 1, "category_id": 99, "bbox": [1, 1, 10, 10]}],
            "categories": [{"id": 1, "name": "dog"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"annotations\[1\] field 'category_id': unknown category 99"):
        read_coco_instances(str(path), str(tmp_path))
    coco["annotations"][1] = {"id": 6, "image_id": 1, "category_id": 1, "bbox": [90, 1, 20, 10]}
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"annotations\[1\] field 'bbox'.*outside"):
        read_coco_instances(str(path), str(tmp_path))
    coco["annotations"][1] = {"id": 6, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 10]}
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="zero or negative size"):
        read_coco_instances(str(path), str(tmp_path))
    coco["annotations"][1] = {"id": 6, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 1, 5, 10]}
    path.write_text(json.dumps(coco))  # Python's json writes and reads the non-standard NaN literal
    with pytest.raises(DataError, match=r"annotations\[1\] field 'bbox': non-finite"):
        read_coco_instances(str(path), str(tmp_path))


def test_llava_image_placeholder_required(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"image": "a.jpg", "conversations": [
        {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A dog."}]}]))
    with pytest.raises(DataError, match=r"record 0 field 'conversations'.*<image>"):
        read_llava(str(path), str(tmp_path))


def _image_path():
    scene = next(s for s in synthetic_corpus().scenes if s.split == "train")
    return str(synthetic_corpus().root / "MSCOCO2017" / "train2017" / f"{scene.image_id:012d}.jpg"), scene


def test_sample_level_errors(tiny_tokenizer, tmp_path):
    encoder = SampleEncoder(tiny_tokenizer)
    path, scene = _image_path()
    # <bbox> without a box
    s = Sample("CB_REF.json#7", path, "referring", [Turn("<image>\n What is <bbox>?", "A dog.")])
    with pytest.raises(DataError, match=r"CB_REF.json record 7 field 'conversation'.*1 <bbox> token\(s\) but 0"):
        encoder.encode(s)
    # [VG] without targets
    s = Sample("CB_GND.json#3", path, "grounding", [Turn("<image>\n Where? [VG]", "Here.")])
    with pytest.raises(DataError, match=r"CB_GND.json record 3 .*\[VG\]"):
        encoder.encode(s)
    # missing image
    s = Sample("CB_GND.json#4", str(tmp_path / "nope.jpg"), "vqa", [Turn("<image>\n Hi?", "Hello.")])
    with pytest.raises(DataError, match=r"CB_GND.json record 4 field 'image': image file not found"):
        encoder.encode(s)
    # corrupt image
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    s = Sample("CB_GND.json#5", str(bad), "vqa", [Turn("<image>\n Hi?", "Hello.")])
    with pytest.raises(DataError, match="cannot read image"):
        encoder.encode(s)
    # box outside the actual image (the annotation did not state the size)
    s = Sample("CB_REF.json#8", path, "referring",
               [Turn("<image>\n What is <bbox>?", "A dog.", [(0, 0, scene.width + 50, 10)])])
    with pytest.raises(DataError, match=r"CB_REF.json record 8 field 'region boxes'.*outside"):
        encoder.encode(s)
    # NaN target
    s = Sample("CB_GND.json#9", path, "grounding",
               [Turn("<image>\n Where? [VG]", "Here.", grounding_boxes_xyxy_abs=[(float("nan"), 0, 5, 5)])])
    with pytest.raises(DataError, match=r"field 'grounding boxes'.*not a finite number"):
        encoder.encode(s)
    # empty dialogue
    with pytest.raises(DataError, match="empty dialogue"):
        encoder.encode(Sample("x.json#1", path, "vqa", []))
    # annotation size disagrees with the file
    s = Sample("x.json#2", path, "vqa", [Turn("<image>\n Hi?", "Hello.")], image_size=(1, 1))
    with pytest.raises(DataError, match="field 'image_size'"):
        encoder.encode(s)


def test_skip_and_count_is_logged_and_bounded(tmp_path, caplog):
    records = [_record(), _record(answer="Here. <dog:[10, 10, 10, 60]>"), _record(), {"image": "a.jpg", "conversation": []}]
    path = _cb_file(tmp_path, records)
    policy = BadRecordPolicy("skip-and-count", max_skipped_records=5)
    with caplog.at_level(logging.WARNING, logger="chatterbox.data"):
        out = read_conversation_file(path, str(tmp_path), policy=policy)
    assert [r.index for r in out] == [0, 2]
    assert policy.skipped == 2
    assert sum("skipped bad record" in r.message for r in caplog.records) == 2
    with pytest.raises(TooManyBadRecords, match="max_skipped_records=1"):
        read_conversation_file(path, str(tmp_path), policy=BadRecordPolicy("skip-and-count", max_skipped_records=1))


def test_stream_skips_records_with_missing_images(tiny_tokenizer, tmp_path):
    """A stream under skip-and-count redraws past a record whose image is missing, and counts it."""
    from chatterbox.data.sources import load_source, build_options
    from chatterbox.data.streams import MixtureDataset
    from chatterbox.data.mixtures import DrawKey
    from data_support import synthetic_data_config
    cfg = synthetic_data_config()
    source = load_source("cb_coco_gnd", cfg)
    source.records[0].image_path = str(tmp_path / "gone.jpg")
    policy = BadRecordPolicy("skip-and-count", 10)
    dataset = MixtureDataset({"cb_coco_gnd": source}, SampleEncoder(tiny_tokenizer), build_options(cfg), policy)
    enc = dataset[DrawKey("cb_coco_gnd", 0, 123, 0)]
    assert policy.skipped == 1 and enc.sample_id != "CB-materials/CB-coco-GND.json#0"
    strict = MixtureDataset({"cb_coco_gnd": source}, SampleEncoder(tiny_tokenizer), build_options(cfg),
                            BadRecordPolicy("error"))
    with pytest.raises(DataError, match="CB-coco-GND.json record 0 field 'image'"):
        strict[DrawKey("cb_coco_gnd", 0, 123, 0)]


def test_a_stream_counts_each_bad_record_once_and_keeps_the_count_across_a_resume(tiny_tokenizer, tmp_path):
    """skip-and-count over a stream: a bad record drawn again and again is one skipped record; the count
    rides in the stream's state (the checkpoint) and is bounded by max_skipped_records."""
    from data_support import synthetic_data_config

    from chatterbox.data.streams import build_stream

    cfg = synthetic_data_config(bad_record_policy="skip-and-count", max_skipped_records=1)
    stream = build_stream(cfg, "grounding", tiny_tokenizer, batch_size=4, seed=0, num_workers=0)
    source = stream.dataset.sources["cb_gnd"]
    source.records[0].image_path = str(tmp_path / "gone.jpg")
    draws = 0
    while not stream.skipped_records:
        next(stream)
        draws += 1
        assert draws < 200, "the broken record was never drawn"
    for _ in range(30):  # the same record drawn again: still one (and within max_skipped_records=1)
        next(stream)
    bad, = stream.skipped_records
    assert stream.report()["skipped_records"] == 1 and bad == "CB-300K/CB_GND.json#0"
    resumed = build_stream(cfg, "grounding", tiny_tokenizer, batch_size=4, seed=0, num_workers=0)
    resumed.load_state_dict(stream.state_dict())
    assert resumed.report() == stream.report()
    for record in source.records[1:]:  # a second bad record passes the bound
        record.image_path = str(tmp_path / "gone.jpg")
    with pytest.raises(TooManyBadRecords, match="more than max_skipped_records=1"):
        for _ in range(200):
            next(stream)


def test_a_stream_reports_dialogues_cut_at_max_length(tiny_tokenizer):
    from data_support import synthetic_data_config

    from chatterbox.data.streams import build_stream

    whole = build_stream(synthetic_data_config(), "referring", tiny_tokenizer, batch_size=8, seed=0, num_workers=0)
    next(whole)
    assert whole.report()["truncated_samples"] == 0
    cut = build_stream(synthetic_data_config(max_length=440), "referring", tiny_tokenizer, batch_size=8, seed=0,
                       num_workers=0)
    for _ in range(3):
        next(cut)
    report = cut.report()
    assert 0 < report["truncated_samples"] <= report["rounds_dropped"]
