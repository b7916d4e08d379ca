"""Evaluation runners: question builders, batched generation, resume, sharding, CB-MRG rounds, bad input.

CPU only: the tiny preset with random weights and a small synthetic corpus in the real file layouts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from chatterbox.data.errors import DataError
from chatterbox.eval import questions as Q
from chatterbox.config import load_config
from chatterbox.eval.runner import DistContext, fingerprint_path, read_jsonl, run_items, shard_path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CHATTERBOX_SHARED_DIR", REPO.parent / "shared"))


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _jpeg(path: Path, size=(64, 48), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


# ----------------------------------------------------------------------------------------------
# Question builders
# ----------------------------------------------------------------------------------------------


def _instances(images, annotations, categories=((1, "toilet"), (2, "sink"), (3, "dog"))):
    return {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, w, h in images],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd}
                            for k, (i, c, b, crowd) in enumerate(annotations)],
            "categories": [{"id": c, "name": n} for c, n in categories]}


def test_coco_grounding_qa_follows_upstream_rules(tmp_path):
    data = _instances(
        images=[(403385, 640, 511), (7, 100, 100), (8, 100, 100), (6818, 427, 640)],
        annotations=[
            (6818, 1, [186.97, 471.83, 100.67, 56.09], 1),  # listed first, crowd: kept, image order rules
            (403385, 1, [411.1, 237.7, 93.01, 242.3], 0),
            (403385, 2, [9.21, 313.62, 142.71, 78.26], 0),
            (7, 3, [1, 2, 3, 4], 0), (7, 3, [5, 6, 7, 8], 0),  # "dog" twice: image 7 is left out
        ])  # image 8 has no annotation: left out
    path = _write_json(tmp_path / "instances_val2017.json", data)
    records = Q.coco_grounding_qa(str(path))
    assert [(r["image_id"], r["catgory"]) for r in records] == [("403385", "toilet"), ("403385", "sink"),
                                                                  ("6818", "toilet")]
    first = records[0]
    # upstream's xywh -> xyxy -> xywh round trip, float noise included, and its answer string
    assert first["gt_box"] == [411.1, 237.7, 93.00999999999999, 242.3]
    assert first["answer"] == "<toilet:[411.1, 237.7, 93.00999999999999, 242.3]>"
    assert first["question"] == "Where is the toilet?" and first["wh"] == [640, 511]
    assert first["filename"] == "000000403385.jpg"
    items = Q.coco_grounding_items(records, "/images")
    assert items[0].user_text == "Where is the toilet? [VG]"
    assert items[0].gt_boxes_xyxy_abs == [(411.1, 237.7, 411.1 + 93.00999999999999, 237.7 + 242.3)]
    assert items[2].image_path == "/images/000000006818.jpg" and items[2].image_size == (427, 640)


def test_coco_grounding_qa_reproduces_upstream_file(tmp_path):
    """Instances rebuilt from upstream's grounding_qa.json (plus images the rules must drop) give back
    the file record for record."""
    ref_path = SHARED / "reference" / "coco_grounding" / "grounding_qa.json"
    if not ref_path.is_file():
        pytest.skip(f"{ref_path} not found (set CHATTERBOX_SHARED_DIR)")
    reference = json.loads(ref_path.read_text())
    names = sorted({r["catgory"] for r in reference})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images, annotations, seen = [], [], set()
    for r in reference:
        image_id = int(r["image_id"])
        if image_id not in seen:
            seen.add(image_id)
            images.append({"id": image_id, "file_name": r["filename"], "width": r["wh"][0], "height": r["wh"][1]})
            if len(images) % 50 == 1:  # a distractor image with a repeated category right after it
                images.append({"id": 10**9 + image_id, "file_name": "x.jpg", "width": 9, "height": 9})
                for _ in range(2):
                    annotations.append({"id": len(annotations), "image_id": 10**9 + image_id,
                                        "category_id": cat_id[names[0]], "bbox": [1.5, 1.5, 2, 2]})
        x, y, w, h = r["gt_box"]
        # the annotation's width/height: COCO's 2-decimal value whose x + w - x gives upstream's float
        w0 = next(c for c in (round(w, d) for d in range(5)) if (x + c) - x == w)
        h0 = next(c for c in (round(h, d) for d in range(5)) if (y + c) - y == h)
        annotations.append({"id": len(annotations), "image_id": image_id, "category_id": cat_id[r["catgory"]],
                            "bbox": [x, y, w0, h0]})
    path = _write_json(tmp_path / "instances_val2017.json",
                       {"images": images, "annotations": annotations,
                        "categories": [{"id": i, "name": n} for n, i in cat_id.items()]})
    built = Q.coco_grounding_qa(str(path))
    assert len(built) == len(reference) == 3422
    assert built == reference
    out = tmp_path / "grounding_qa.json"
    Q.write_grounding_qa(built, str(out))
    assert json.loads(out.read_text()) == reference


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["annotations"][1].update(image_id=999), "image_id"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]), "bbox"),
    (lambda d: d["annotations"][0].update(category_id=77), "category_id"),
    (lambda d: d["images"][0].pop("file_name"), "file_name"),
])
def test_coco_grounding_qa_bad_annotation_names_file_record_field(tmp_path, mutate, field):
    data = _instances([(1, 10, 10)], [(1, 1, [1, 1, 2, 2], 0), (1, 2, [3, 3, 2, 2], 0)])
    mutate(data)
    path = _write_json(tmp_path / "instances_val2017.json", data)
    with pytest.raises(DataError) as e:
        Q.coco_grounding_qa(str(path))
    assert e.value.field == field and "instances_val2017.json" in str(e.value)
    assert e.value.record is not None


def _write_refer(root: Path):
    """A refer-toolkit refcocog folder: refs(umd).p + instances.json, and the COCO 2014 images."""
    inst = {"images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 50, "image_id": 5, "category_id": 1, "bbox": [10.7, 5.2, 20.6, 30.9]},
                            {"id": 51, "image_id": 5, "category_id": 1, "bbox": [40.0, 1.0, 20.0, 20.0]}],
            "categories": [{"id": 1, "name": "dog"}]}
    refs = [
        {"ref_id": 0, "ann_id": 50, "image_id": 5, "split": "test", "category_id": 1,
         "file_name": "COCO_train2014_000000000005_50.jpg",
         "sentences": [{"sent": "The Brown dog", "raw": "The Brown dog"}, {"sent": "a dog left", "raw": ""}]},
        {"ref_id": 1, "ann_id": 51, "image_id": 5, "split": "val", "category_id": 1,
         "file_name": "COCO_train2014_000000000005_51.jpg", "sentences": [{"sent": "small dog"}]},
    ]
    folder = root / "refer" / "refcocog"
    _write_json(folder / "instances.json", inst)
    with open(folder / "refs(umd).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    _jpeg(root / "MSCOCO2014" / "train2014" / "COCO_train2014_000000000005.jpg")
    return folder


def test_refcocog_referring_questions_and_items(tmp_path):
    folder = _write_refer(tmp_path)
    by_split = Q.referring_questions(str(folder / "refs(umd).p"), str(folder / "instances.json"), "refcocog")
    assert sorted(by_split) == ["test", "val"]
    test = by_split["test"][0]
    # int() of x, y, x + w, y + h (not int(x) + int(w)): 10.7 + 20.6 = 31.3 -> 31, 5.2 + 30.9 = 36.1 -> 36
    assert test["question"] == "What is it <bbox>?[[10, 5, 31, 36]]"
    assert test["answer"] == ["the brown dog.", "a dog left."]
    assert test["ref_id"] == 0 and test["image_id"] == 5
    suffix = "Please give a brief answer in one sentence less than 10 words."
    items = Q.referring_items(by_split["test"], str(tmp_path / "MSCOCO2014" / "train2014"), suffix)
    assert items[0].user_text == "What is it <bbox>?" + suffix
    assert items[0].region_boxes_xyxy_abs == [(10.0, 5.0, 31.0, 36.0)]
    assert items[0].image_path.endswith("train2014/COCO_train2014_000000000005.jpg")
    assert items[0].references == ["the brown dog.", "a dog left."]
    with pytest.raises(DataError, match="box list"):
        Q.referring_items([{**test, "question": "What is it <bbox>?[[1, 2"}], "/x", suffix)


def test_rec_items_one_question_per_sentence_per_split(tmp_path):
    _write_refer(tmp_path)
    items = Q.rec_items(str(tmp_path / "refer"), "refcocog", "umd", ["val", "test"],
                        str(tmp_path / "MSCOCO2014" / "train2014"))
    assert [(it.group, it.user_text) for it in items] == [
        ("val", "Where is small dog? [VG]"), ("test", "Where is The Brown dog? [VG]"), ("test", "Where is a dog left? [VG]")]
    assert items[1].gt_boxes_xyxy_abs[0] == pytest.approx((10.7, 5.2, 31.3, 36.1))
    assert len({it.item_id for it in items}) == 3


def _write_mrg(root: Path) -> Path:
    """Two CB-MRG dialogues covering: region by name, <it> placeholder, multi-box answer, no region."""
    _jpeg(root / "VG" / "VG_100K" / "1.jpg", (100, 80))
    _jpeg(root / "VG" / "VG_100K" / "2.jpg", (100, 80), (20, 20, 200))
    data = {"data": [
        {"image": "VG_100K/1.jpg", "image_wh": [100, 80], "conversation": [
            {"from": "human", "value": "What is next to the dog? <dog:[10, 10, 30, 30]>"},
            {"from": "gpt", "value": "A cat is next to the dog. <cat:[40, 10, 60, 30]>"},
            {"from": "human", "value": "What is <it> sitting on? <cat:[40, 10, 60, 30]>"},
            {"from": "gpt", "value": "The mat and the floor. <mat:[35, 30, 70, 40], floor:[0, 40, 100, 80]>"},
            {"from": "human", "value": "Where is the ball?"},
            {"from": "gpt", "value": "On the floor. <ball:[80, 60, 90, 70]>"}]},
        {"image": "VG_100K/2.jpg", "conversation": [
            {"from": "human", "value": "What colour is the sky?"},
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "What is below the tree? <tree:[5, 5, 20, 40]>"},
            {"from": "gpt", "value": "<grass:[0, 40, 100, 80]>"}]},
    ]}
    return _write_json(root / "CB-300K" / "CB_MRG.json", data)


def test_mrg_dialogue_rounds(tmp_path):
    path = _write_mrg(tmp_path)
    d1, d2 = Q.mrg_dialogues(str(path), str(tmp_path / "VG"))
    r1, r2, r3 = d1.rounds
    assert r1.user_text == "What is next to the region <bbox>? [VG]"
    assert r1.region_boxes_xyxy_abs == [(10.0, 10.0, 30.0, 30.0)] and r1.target_box_xyxy_abs == (40.0, 10.0, 60.0, 30.0)
    assert r1.reference_answer == "A cat is next to the region." and r1.plain_question == "What is next to the dog?"
    assert r2.user_text == "What is it <bbox> sitting on?" and not r2.is_grounding  # two answer boxes: no [VG]
    assert r2.plain_question == "What is it sitting on?"
    assert r3.user_text == "Where is the ball? [VG]" and not r3.is_referring
    s1, s2 = d2.rounds
    assert not s1.is_referring and not s1.is_grounding and s1.user_text == "What colour is the sky?"
    assert s2.reference_answer == "the grass." and s2.is_grounding and s2.is_referring
    off = Q.mrg_dialogues(str(path), str(tmp_path / "VG"), Q.MrgOptions(regions="off", grounding="off"))
    assert [r.user_text for r in off[0].rounds] == ["What is next to the dog?", "What is it sitting on?",
                                                    "Where is the ball?"]


def test_mrg_bad_record_names_file_record_field(tmp_path):
    path = _write_mrg(tmp_path)
    data = json.loads(path.read_text())
    data["data"][1]["conversation"][3]["value"] = "Grass. <grass:[0, 40, 100>"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        Q.mrg_dialogues(str(path), str(tmp_path / "VG"))
    assert e.value.record == 1 and e.value.field == "conversation[3].value" and "CB_MRG.json" in e.value.file
    from chatterbox.data.errors import BadRecordPolicy

    policy = BadRecordPolicy("skip-and-count")
    assert len(Q.mrg_dialogues(str(path), str(tmp_path / "VG"), policy=policy)) == 1 and policy.skipped == 1


# ----------------------------------------------------------------------------------------------
# Runner: JSONL, resume, sharding (model-free)
# ----------------------------------------------------------------------------------------------


def _fake_predict(calls):
    def predict(batch):
        calls.append(list(batch))
        return [{"value": x * 10} for x in batch]
    return predict


def test_run_items_resume_after_interruption_gives_same_file(tmp_path):
    items = list(range(11))
    full = tmp_path / "full" / "predictions.jsonl"
    run_items(items, str, _fake_predict([]), full, batch_size=3)

    part = tmp_path / "part" / "predictions.jsonl"
    calls = []

    def stop_after_two_batches(batch):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_predict(calls)(batch)

    with pytest.raises(KeyboardInterrupt):
        run_items(items, str, stop_after_two_batches, part, batch_size=3)
    assert [r["id"] for r in read_jsonl(part)] == ["0", "1", "2", "3", "4", "5"]
    with open(part, "a") as f:
        f.write('{"id": "6", "val')  # a writer killed mid-line
    calls.clear()
    records, stats = run_items(items, str, _fake_predict(calls), part, batch_size=3)
    assert stats.num_resumed == 6 and stats.num_generated == 5
    assert calls == [[6, 7, 8], [9, 10]]  # only the missing items, in the same batches
    assert part.read_bytes() == full.read_bytes()
    assert [r["value"] for r in records] == [x * 10 for x in items]


def test_run_items_rejects_corrupt_or_foreign_files(tmp_path):
    out = tmp_path / "predictions.jsonl"
    out.write_text('{"id": "0", "value": 0}\nnot json\n{"id": "2"}\n')
    with pytest.raises(DataError, match="line 2"):
        run_items(list(range(3)), str, _fake_predict([]), out, batch_size=2)
    out.write_text('{"id": "zzz"}\n')
    with pytest.raises(DataError, match="zzz"):
        run_items(list(range(3)), str, _fake_predict([]), out, batch_size=2)


def test_run_items_resumes_only_the_run_that_wrote_the_predictions(tmp_path):
    items = list(range(5))
    out = tmp_path / "predictions.jsonl"
    first = {"checkpoint": "/exports/a", "options": {"dtype": "fp32"}}
    run_items(items, str, _fake_predict([]), out, batch_size=2, fingerprint=first)
    assert json.loads(fingerprint_path(out).read_text()) == first
    calls = []
    _, stats = run_items(items, str, _fake_predict(calls), out, batch_size=2, fingerprint=dict(first))
    assert stats.num_resumed == 5 and calls == []
    other = {"checkpoint": "/exports/b", "options": {"dtype": "fp32"}}
    with pytest.raises(DataError, match=r"written by another run \(differs in checkpoint: '/exports/a' then, "
                                        r"'/exports/b' now\)") as e:
        run_items(items, str, _fake_predict(calls), out, batch_size=2, fingerprint=other)
    assert e.value.file == str(out) and calls == []
    fingerprint_path(out).unlink()  # predictions whose origin is unknown are not resumed either
    with pytest.raises(DataError, match="unknown run"):
        run_items(items, str, _fake_predict(calls), out, batch_size=2, fingerprint=first)


def test_run_fingerprint_follows_the_weights_and_settings_not_the_batching(tmp_path):
    from chatterbox.eval.runner import run_fingerprint

    spec = importlib.util.spec_from_file_location("coco_grounding", REPO / "evaluation" / "coco_grounding.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    export = tmp_path / "export"
    export.mkdir()
    (export / "weights.safetensors").write_bytes(b"0" * 10)

    def fingerprint(*extra):
        args = runner.parse_args(["--config", "tiny_stage2", "--checkpoint", str(export), *extra])
        return run_fingerprint(args, load_config("tiny_stage2", args.overrides))

    base = fingerprint()
    assert fingerprint("--batch-size", "7", "--device", "cpu", "--limit", "3") == base
    assert fingerprint("--dtype", "bf16") != base
    assert fingerprint("--set", "eval.max_new_tokens=9") != base
    (export / "weights.safetensors").write_bytes(b"1" * 11)  # retrained in place
    assert fingerprint() != base


def test_run_items_shards_merge_into_the_one_process_file(tmp_path):
    """Ranks run whole batches r, r + world, ...; rank 0's merge equals one process's file. (Ranks are
    simulated in sequence here; the barriers are no-ops without a process group.)"""
    items = list(range(9))
    single = tmp_path / "one" / "predictions.jsonl"
    run_items(items, str, _fake_predict([]), single, batch_size=2)
    out = tmp_path / "two" / "predictions.jsonl"
    calls = []
    # rank 1 first: its shard file stays until rank 0 merges
    for rank in (1, 0):
        run_items(items, str, _fake_predict(calls), out, batch_size=2, dist=DistContext(rank, 2))
    assert calls == [[2, 3], [6, 7], [0, 1], [4, 5], [8]]
    assert out.read_bytes() == single.read_bytes()
    assert not shard_path(out, 1, 2).exists()


# ----------------------------------------------------------------------------------------------
# With the tiny model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup():
    from chatterbox.eval.runner import RequestEncoder, load_eval_model

    cfg = load_config("tiny_stage1", ["eval.max_new_tokens=6"])
    model = load_eval_model(cfg, "", torch.device("cpu"), torch.float32, seed=0)
    return cfg, model, RequestEncoder.from_config(model.tokenizer, cfg)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from chatterbox.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("synthetic") / "data"
    write_corpus(root, num_images=12, seed=3)
    return root


def _coco_items(root: Path, n: int):
    records = Q.coco_grounding_qa(str(root / "MSCOCO2017" / "annotations" / "instances_val2017.json"))
    return Q.coco_grounding_items(records, str(root / "MSCOCO2017" / "val2017"))[:n]


def test_single_round_runner_resume_with_the_model(tmp_path, tiny_setup, synthetic_root):
    from chatterbox.eval.benchmarks import (evaluate_grounding_file, grounding_prediction_entries,
                                            SingleRoundPredictor)

    cfg, model, encoder = tiny_setup
    items = _coco_items(synthetic_root, 5)
    predict = SingleRoundPredictor(model, encoder, max_new_tokens=6, box_threshold=0.3)
    full = tmp_path / "full.jsonl"
    records, _ = run_items(items, lambda it: it.item_id, predict, full, batch_size=2)
    for it, rec in zip(items, records):
        assert rec["vg_in_prompt"] == 1 and len(rec["box_xyxy_abs"]) == 4 and rec["prompt"] == it.user_text
        w, h = it.image_size
        x1, y1, x2, y2 = rec["box_xyxy_abs"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h

    part = tmp_path / "part.jsonl"
    seen = []

    def interrupted(batch):
        if seen:
            raise KeyboardInterrupt  # "killed" after the first batch (2 items)
        seen.append(batch)
        return predict(batch)

    with pytest.raises(KeyboardInterrupt):
        run_items(items, lambda it: it.item_id, interrupted, part, batch_size=2)
    _, stats = run_items(items, lambda it: it.item_id, predict, part, batch_size=2)
    assert stats.num_resumed == 2 and part.read_bytes() == full.read_bytes()

    entries = grounding_prediction_entries(items, records)
    assert entries[0]["gt"] == items[0].upstream["gt_box"] and all(isinstance(v, int) for v in entries[0]["out_boxes"])
    path = tmp_path / "prediction.json"
    path.write_text(json.dumps(entries, indent=1))
    ev = evaluate_grounding_file(path)
    assert ev.summary.num_samples == 5 and 0 <= ev.summary.miou <= 1


def test_prefetched_images_give_the_same_predictions_and_errors(tmp_path, tiny_setup, synthetic_root):
    import dataclasses

    from chatterbox.eval.benchmarks import SingleRoundPredictor

    _, model, encoder = tiny_setup
    items = _coco_items(synthetic_root, 5)
    predict = SingleRoundPredictor(model, encoder, max_new_tokens=4, box_threshold=0.3)
    prefetched, _ = run_items(items, lambda it: it.item_id, predict, tmp_path / "a.jsonl", batch_size=2)
    assert not predict.images._pending  # every prefetched image was used
    serial, _ = run_items(items, lambda it: it.item_id, lambda batch: predict(batch), tmp_path / "b.jsonl", batch_size=2)
    assert prefetched == serial
    # a missing image in the second batch: read ahead, raised when its batch is answered, the first kept
    broken = items[:2] + [dataclasses.replace(items[2], image_path=str(tmp_path / "gone.jpg"))] + items[3:]
    with pytest.raises(DataError, match="image file not found") as e:
        run_items(broken, lambda it: it.item_id, predict, tmp_path / "c.jsonl", batch_size=2)
    assert e.value.field == "image" and e.value.record == items[2].item_id.rpartition("#")[2]
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 2


def test_the_grounding_box_does_not_depend_on_the_reply_length(tiny_setup, synthetic_root):
    from chatterbox.eval.benchmarks import SingleRoundPredictor

    _, model, encoder = tiny_setup
    items = _coco_items(synthetic_root, 5)
    short = SingleRoundPredictor(model, encoder, max_new_tokens=1, box_threshold=0.3)(items)
    long = SingleRoundPredictor(model, encoder, max_new_tokens=8, min_new_tokens=8, box_threshold=0.3)(items)
    assert [r["num_generated_tokens"] for r in long] == [8] * 5
    for a, b in zip(short, long):
        assert a["box_xyxy_abs"] == pytest.approx(b["box_xyxy_abs"], abs=1e-3)
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_missing_image_is_a_clear_error(tiny_setup, tmp_path):
    from chatterbox.eval.runner import GenerationRequest

    _, _, encoder = tiny_setup
    request = GenerationRequest.single_turn("grounding_qa.json#7", str(tmp_path / "nope.jpg"), "Where is it? [VG]")
    with pytest.raises(DataError) as e:
        encoder.encode(request)
    assert e.value.file == "grounding_qa.json" and e.value.record == "7" and e.value.field == "image"
    assert "nope.jpg" in str(e.value)
    bad = GenerationRequest.single_turn("q.json#1", str(tmp_path / "nope.jpg"), "What is it <bbox>?")
    with pytest.raises(DataError, match="1 <bbox> tokens but 0 region boxes"):
        encoder.encode(bad)


def test_referring_raw_output_format(tiny_setup, tmp_path):
    from chatterbox.eval.benchmarks import referring_raw_output, SingleRoundPredictor

    cfg, model, encoder = tiny_setup
    folder = _write_refer(tmp_path)
    records = Q.referring_questions(str(folder / "refs(umd).p"), str(folder / "instances.json"), "refcocog")["test"]
    items = Q.referring_items(records, str(tmp_path / "MSCOCO2014" / "train2014"), cfg.eval.referring_suffix)
    predict = SingleRoundPredictor(model, encoder, max_new_tokens=6, box_threshold=None)
    out, _ = run_items(items, lambda it: it.item_id, predict, tmp_path / "p.jsonl", batch_size=4)
    raw = referring_raw_output(items, out)
    assert set(raw[0]) == {"gt", "ref_id", "id", "image_abs_path", "input_bbox", "prompt", "text_output"}
    assert raw[0]["prompt"] == "What is it <bbox>?" and raw[0]["input_bbox"] == [[10, 5, 31, 36]]
    assert raw[0]["text_output"] == out[0]["text"] and raw[0]["gt"] == ["the brown dog.", "a dog left."]


def test_referring_name_accuracy_counts_whole_words_and_reports_the_frequency_baseline():
    from chatterbox.eval.benchmarks import names_object, referring_name_accuracy

    assert names_object("It is a Red circle.", "red circle")
    assert not names_object("It is a reddish circle.", "red circle")  # whole words only
    assert not names_object("It is a circle.", "red circle")  # every word of the name
    result = referring_name_accuracy(["It is a red circle.", "It is a red circle.", "a blue square", "x"],
                                     ["red circle", "blue square", "blue square", None])
    assert result == {"name_accuracy": 2 / 3, "name_accuracy_most_frequent_category": 2 / 3,
                      "name_word_accuracy": [2 / 3, 2 / 3], "name_word_accuracy_most_frequent": [2 / 3, 2 / 3],
                      "num_named": 3, "num_unnamed": 1}
    # each word on its own: the colour right, the kind wrong
    by_word = referring_name_accuracy(["a red square", "a blue circle", "a red square"],
                                      ["red circle", "blue square", "red triangle"])
    assert by_word["name_accuracy"] == 0 and by_word["name_word_accuracy"] == [1.0, 0.0]
    assert by_word["name_word_accuracy_most_frequent"] == [2 / 3, 1 / 3]
    with pytest.raises(ValueError, match="2 answers but 1"):
        referring_name_accuracy(["a", "b"], ["dog"])


class _RecordingEncoder:
    """Wraps a RequestEncoder and keeps every request it encodes (to inspect the prompts)."""

    def __init__(self, inner):
        self.inner, self.requests = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, request, image=None):
        self.requests.append(request)
        return self.inner.encode(request, image)


@pytest.mark.parametrize("history", ["model", "ground_truth"])
def test_mrg_runs_rounds_in_order_on_the_chosen_history(tmp_path, tiny_setup, history):
    from chatterbox.eval.mrg import MrgRunOptions, mrg_predictor

    _, model, encoder = tiny_setup
    dialogues = Q.mrg_dialogues(str(_write_mrg(tmp_path)), str(tmp_path / "VG"))
    recorder = _RecordingEncoder(encoder)
    predict = mrg_predictor(model, recorder, MrgRunOptions(history=history, max_new_tokens=6))
    records, _ = run_items(dialogues, lambda d: d.dialogue_id, predict, tmp_path / "mrg.jsonl", batch_size=2)
    assert [len(r["rounds"]) for r in records] == [3, 2] and all(x["run"] for r in records for x in r["rounds"])
    by_id = {}
    for req in recorder.requests:
        by_id.setdefault(req.request_id.rsplit("/round", 1)[0], []).append(req)
    first = by_id[dialogues[0].dialogue_id]
    assert [len(r.messages) for r in first] == [1, 3, 5]
    assert first[0].messages[0].text == "<image> What is next to the region <bbox>? [VG]"
    # plain history: earlier questions as text; the current round keeps its <bbox> and its box
    assert first[2].messages[0].text == "<image> What is next to the dog?"
    assert first[2].region_boxes_xyxy_abs == [] and first[1].region_boxes_xyxy_abs == [(40.0, 10.0, 60.0, 30.0)]
    answer_1 = first[1].messages[1].text
    if history == "ground_truth":
        assert answer_1 == "A cat is next to the region."
    else:
        from chatterbox.eval.mrg import _history_answer

        assert answer_1 == _history_answer(records[0]["rounds"][0]["text"])
    r1 = records[0]["rounds"][0]
    assert r1["target_box_xyxy_abs"] == [40.0, 10.0, 60.0, 30.0] and len(r1["box_xyxy_abs"]) == 4


def test_evaluate_mrg_breaks_down_by_round():
    from chatterbox.eval.mrg import evaluate_mrg

    def rnd(k, target=None, box=None, region=False, text="a cat", run=True):
        return {"round": k, "run": run, "target_box_xyxy_abs": target, "box_xyxy_abs": box, "text": text,
                "region_boxes_xyxy_abs": [[0, 0, 1, 1]] if region else [], "reference_answer": "a cat"}

    records = [
        {"id": "d0", "rounds": [rnd(1, [0, 0, 10, 10], [0, 0, 10, 10], region=True),
                                rnd(2, [0, 0, 10, 10], [0, 0, 10, 5])]},  # IoU 1.0, 0.5
        {"id": "d1", "rounds": [rnd(1, [0, 0, 10, 10], [20, 20, 30, 30]),  # IoU 0
                                rnd(2, [0, 0, 10, 10], None, region=True, run=False, text="")]},  # not run
    ]
    summary = evaluate_mrg(records, scorer=None)
    g = summary["grounding"]
    assert g["num_samples"] == 4 and g["num_missing"] == 1 and summary["num_rounds_not_run"] == 1
    assert g["miou"] == pytest.approx(1.5 / 4) and g["success_rate"] == pytest.approx(0.5)
    assert g["by_round"]["1"]["success_rate"] == pytest.approx(0.5) and g["by_round"]["1"]["miou"] == pytest.approx(0.5)
    assert g["by_round"]["2"]["miou"] == pytest.approx(0.25) and g["by_round"]["2"]["num_missing"] == 1
    assert g["dialogue_all_success_rate"] == pytest.approx(0.5)
    assert summary["referring"] == {"num_samples": 2, "skipped": "no caption scorer"}


def test_evaluate_mrg_later_rounds_and_target_swap_control():
    from chatterbox.eval.mrg import evaluate_mrg

    def rnd(k, target, box):
        return {"round": k, "run": True, "target_box_xyxy_abs": target, "box_xyxy_abs": box, "text": "",
                "region_boxes_xyxy_abs": [], "reference_answer": ""}

    a, b = [0, 0, 10, 10], [50, 50, 60, 60]
    follows = {"id": "d0", "rounds": [rnd(1, a, a), rnd(2, b, b), rnd(3, a, a)]}
    same_box = {"id": "d1", "rounds": [rnd(1, a, a), rnd(2, b, a), rnd(3, a, a)]}
    g = evaluate_mrg([follows], scorer=None)["grounding"]
    assert g["success_rate"] == 1.0 and g["success_rate_target_swapped"] == 0.0
    assert g["later_rounds"]["num_samples"] == 2 and g["later_rounds"]["success_rate"] == 1.0
    assert g["later_rounds"]["success_rate_target_swapped"] == 0.0
    # one box for every round: right where the target happens to be that box, and as right swapped
    g = evaluate_mrg([same_box], scorer=None)["grounding"]
    assert g["later_rounds"]["success_rate"] == 0.5 and g["later_rounds"]["success_rate_target_swapped"] == 0.5
    assert g["success_rate"] == pytest.approx(2 / 3) and g["success_rate_target_swapped"] == pytest.approx(1 / 3)
    # a dialogue whose [VG] rounds all share one target has no partner: not in the control's denominator
    g = evaluate_mrg([{"id": "d2", "rounds": [rnd(1, a, a), rnd(2, a, None)]}], scorer=None)["grounding"]
    assert g["num_target_swappable"] == 0 and g["success_rate_target_swapped"] is None
    assert g["later_rounds"]["num_missing"] == 1


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs Java")
def test_evaluate_mrg_caption_metrics_per_round():
    from chatterbox.eval.caption_metrics import CaptionScorer
    from chatterbox.eval.mrg import evaluate_mrg

    def rnd(k, text, ref):
        return {"round": k, "run": True, "target_box_xyxy_abs": None, "box_xyxy_abs": None, "text": text,
                "region_boxes_xyxy_abs": [[0, 0, 1, 1]], "reference_answer": ref}

    records = [{"id": f"d{i}", "rounds": [rnd(1, "a red cat on the mat", "a red cat on the mat"),
                                          rnd(2, "nothing here at all", "a blue dog")]} for i in range(2)]
    with CaptionScorer(with_meteor=False) as scorer:
        summary = evaluate_mrg(records, scorer)
    ref = summary["referring"]
    assert ref["num_samples"] == 4 and set(ref["by_round"]) == {"1", "2"}
    assert ref["by_round"]["1"]["Bleu_1"] == pytest.approx(1.0) and ref["by_round"]["2"]["Bleu_1"] < 0.01
    assert summary["grounding"] is None


# ----------------------------------------------------------------------------------------------
# Command line: sharded (torchrun, gloo, 2 processes) == one process
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coco_grounding_command_sharded_equals_single(tmp_path, synthetic_root):
    sets = ["--set", f"data.paths.coco2017_dir={synthetic_root / 'MSCOCO2017'}", "--set", "eval.max_new_tokens=4"]
    common = ["--config", "tiny_stage1", *sets, "--limit", "5", "--batch-size", "2", "--device", "cpu", "--query-swap"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    script = str(REPO / "evaluation" / "coco_grounding.py")
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         script, *common, "--output-dir", str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single = subprocess.run([sys.executable, script, *common, "--output-dir", str(tmp_path / "one")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for name in ("predictions.jsonl", "prediction.json", "grounding_qa.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    metrics = json.loads(single.stdout.strip().splitlines()[-1])
    assert metrics["num_samples"] == 5 and set(metrics) >= {"miou", "success_rate", "miou_at_success"}
    # the controls: the query swap, and the words shared with another shape of the image ("red circle")
    assert metrics["num_query_swappable"] <= 5 and metrics["success_rate_by_shared_word"]  # seed 3: two circles
    for shared in metrics["success_rate_by_shared_word"]:
        assert shared["word"] in (0, 1) and 1 <= shared["num_questions"] <= 5 and 0 < shared["chance"] <= 0.5
    assert json.loads(sharded.stdout.strip().splitlines()[-1]) == metrics
    assert not list((tmp_path / "two").glob("*.rank*"))


def test_mrg_rounds_past_the_context_are_counted_not_dropped(tmp_path, tiny_setup):
    import copy

    from chatterbox.eval.mrg import MrgRunOptions, evaluate_mrg, mrg_predictor
    from chatterbox.eval.runner import GenerationRequest

    _, model, encoder = tiny_setup
    dialogues = Q.mrg_dialogues(str(_write_mrg(tmp_path)), str(tmp_path / "VG"))[:1]
    first = dialogues[0].rounds[0]
    first_len = len(encoder.prompt_ids(GenerationRequest.single_turn("x#0", "", first.user_text, [(0, 0, 1, 1)])))
    small = copy.copy(encoder)
    small.max_length = first_len + 6  # round 1 fits with its 6 new tokens; round 2 (longer prompt) does not
    records, _ = run_items(dialogues, lambda d: d.dialogue_id,
                           mrg_predictor(model, small, MrgRunOptions(max_new_tokens=6)), tmp_path / "m.jsonl",
                           batch_size=1)
    assert [r["run"] for r in records[0]["rounds"]] == [True, False, False]
    summary = evaluate_mrg(records, scorer=None)
    assert summary["num_rounds_not_run"] == 2
    assert summary["grounding"]["num_samples"] == 2 and summary["grounding"]["num_missing"] == 1
