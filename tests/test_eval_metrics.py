"""Grounding / REC metrics, the prediction-file reader, reports, and the COCO grounding reproduction."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatterbox.eval.grounding_metrics import (
    GroundingInputError,
    GroundingRecord,
    evaluate_grounding,
    evaluate_query_swap,
    evaluate_shared_words,
    iou_per_item,
    read_upstream_grounding_predictions,
    rec_accuracy,
    query_swap_partners,
    rec_accuracy_per_split,
    summarize_ious,
    summarize_ious_by_group,
)
from chatterbox.eval.reports import markdown_table, visualize_grounding, write_summary_json

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CHATTERBOX_SHARED_DIR", REPO_ROOT.parent / "shared"))
COCO_PREDICTIONS = SHARED_DIR / "reference" / "coco_grounding" / "prediction.json"
COCO_QUESTIONS = SHARED_DIR / "reference" / "coco_grounding" / "grounding_qa.json"


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _entry(gt_xywh, out_xyxy, score=0.9, **extra):
    e = {"gt": gt_xywh, "out_boxes": out_xyxy, "score": score, "prompt": "Where is the dog? [VG]",
         "image_abs_path": "/nowhere/img.jpg", "out_category": "dog"}
    e.update(extra)
    return e


# ------------------------------------------------------------------ IoU by hand


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 2, 2], [1, 0, 3, 2], 2 / 6),  # half overlap: inter 2, union 4 + 4 - 2
        ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),  # contained
        ([0, 0, 1, 1], [1, 1, 2, 2], 0.0),  # corners touch: no area
        ([0, 0, 1, 1], [5, 5, 6, 6], 0.0),  # disjoint
        ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),  # no +1: (+1 would give 66/121)
        ([2.5, 0, 7.5, 10], [0, 0, 10, 10], 0.5),  # float corners are used as they are
        ([3, 3, 3, 8], [0, 0, 10, 10], 0.0),  # zero-width prediction
    ],
)
def test_iou_hand_checked(pred, gt, expected):
    assert iou_per_item([pred], [gt]).item() == pytest.approx(expected, abs=1e-12)


def test_iou_is_float64_and_symmetric():
    a = torch.tensor([[0.0, 0.0, 3.0, 7.0], [1.0, 2.0, 5.0, 9.0]])
    b = torch.tensor([[1.0, 1.0, 4.0, 4.0], [0.0, 0.0, 2.0, 3.0]])
    ab, ba = iou_per_item(a, b), iou_per_item(b, a)
    assert ab.dtype == torch.float64
    torch.testing.assert_close(ab, ba)
    with pytest.raises(ValueError, match="2 predicted boxes but 1"):
        iou_per_item(a, b[:1])


def test_summary_counts_threshold_inclusively():
    s = summarize_ious([1.0, 0.5, 0.49, 0.0], num_missing=1)
    assert s.num_samples == 4 and s.num_success == 2 and s.num_missing == 1
    assert s.miou == pytest.approx((1.0 + 0.5 + 0.49) / 4)
    assert s.success_rate == 0.5
    assert s.miou_at_success == pytest.approx(0.75)


def test_summary_without_success_and_bad_ious():
    s = summarize_ious([0.1, 0.2])
    assert s.num_success == 0 and s.success_rate == 0.0 and s.miou_at_success is None
    with pytest.raises(ValueError, match="no items"):
        summarize_ious([])
    with pytest.raises(ValueError, match=r"IoU\[1\]=nan"):
        summarize_ious([0.3, float("nan")])
    with pytest.raises(ValueError, match=r"IoU\[0\]=1.5"):
        summarize_ious([1.5])


def test_summary_by_group_keeps_each_denominator():
    groups = summarize_ious_by_group([0.9, 0.1, 0.6, 0.0], ["r0", "r1", "r0", "r1"], missing_mask=[0, 0, 0, 1])
    assert list(groups) == ["r0", "r1"]
    assert groups["r0"].success_rate == 1.0 and groups["r0"].num_samples == 2
    assert groups["r1"].success_rate == 0.0 and groups["r1"].num_missing == 1 and groups["r1"].num_samples == 2


# ------------------------------------------------------------------ REC accuracy on synthetic predictions


def test_rec_accuracy_per_split_on_synthetic_boxes():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=gen, dtype=torch.float64) * 100
    wh = 10 + torch.rand(40, 2, generator=gen, dtype=torch.float64) * 50
    gt = torch.cat([xy, xy + wh], dim=1)
    # Shift every box right by a fraction f of its width: IoU = (1 - f) / (1 + f) -> >= 0.5 iff f <= 1/3.
    fractions = torch.tensor([0.0, 0.2, 0.3, 0.34, 0.5, 1.2] * 7)[:40].to(torch.float64)
    shift = torch.zeros_like(gt)
    shift[:, 0] = shift[:, 2] = fractions * wh[:, 0]
    pred = gt + shift
    expected_correct = int((fractions <= 1 / 3).sum())
    assert rec_accuracy(pred, gt) == pytest.approx(expected_correct / 40)

    out = rec_accuracy_per_split({"val": (pred[:20], gt[:20]), "testA": (pred[20:], gt[20:]), "testB": (gt, gt)})
    assert out["val"]["num_correct"] == int((fractions[:20] <= 1 / 3).sum())
    assert out["testA"]["num_correct"] == int((fractions[20:] <= 1 / 3).sum())
    assert out["testB"] == {"accuracy": 1.0, "num_correct": 40, "num_samples": 40, "iou_threshold": 0.5}


# ------------------------------------------------------------------ prediction-file reader


def test_reader_converts_gt_xywh_and_keeps_pred_xyxy(tmp_path):
    path = _write(tmp_path / "p.json", [_entry([10, 20, 30, 40], [10, 20, 40, 60]),
                                        _entry([0, 0, 10, 10], [5, 0, 15, 10], split="val")])
    preds = read_upstream_grounding_predictions(path)
    assert preds.records[0].gt_box_xyxy_abs == (10.0, 20.0, 40.0, 60.0)
    ev = evaluate_grounding(preds)
    assert ev.ious.tolist() == pytest.approx([1.0, 50 / 150])
    assert ev.summary.num_success == 1 and ev.summary.miou_at_success == 1.0


def test_reader_counts_upstream_fallback_as_a_real_miss(tmp_path):
    path = _write(tmp_path / "p.json", [_entry([10, 10, 5, 5], [10, 10, 15, 15]), _entry([10, 10, 5, 5], [0, 0, 1, 1], score=0)])
    ev = evaluate_grounding(read_upstream_grounding_predictions(path))
    assert ev.num_fallback == 1 and ev.summary.num_samples == 2 and ev.summary.success_rate == 0.5


@pytest.mark.parametrize(
    "bad_entry, message",
    [
        (_entry([0, 0, 10, 10], [0, 0, 5, 5], score=float("nan")), r"entry 1\.score: expected a finite number"),
        (_entry([0, 0, 10, 10], [0, 0, 5]), r"entry 1\.out_boxes: expected 4 numbers"),
        (_entry([0, 0, 10, 10], [0, 0, "5", 5]), r"entry 1\.out_boxes: expected 4 numbers"),
        (_entry([0, 0, 10, 10], [0, 0, float("inf"), 5]), r"entry 1\.out_boxes: not finite"),
        (_entry([0, 0, 10, 10], [9, 0, 5, 5]), r"entry 1\.out_boxes: xyxy box with x2 < x1"),
        (_entry([0, 0, 10, 10], [[0, 0, 5, 5], [1, 1, 2, 2]]), r"entry 1\.out_boxes: expected 4 numbers"),
        (_entry([0, 0, -1, 10], [0, 0, 5, 5]), r"entry 1\.gt: negative width/height"),
        (_entry([0, 0, float("nan"), 10], [0, 0, 5, 5]), r"entry 1\.gt: not finite"),
        ({"out_boxes": [0, 0, 5, 5]}, r"entry 1: missing field 'gt'"),
        ("not a dict", r"entry 1: expected an object"),
    ],
)
def test_reader_rejects_bad_entries_by_index_and_field(tmp_path, bad_entry, message):
    path = _write(tmp_path / "p.json", [_entry([0, 0, 10, 10], [0, 0, 10, 10]), bad_entry])
    with pytest.raises(GroundingInputError, match=message) as info:
        read_upstream_grounding_predictions(path)
    assert str(path) in str(info.value)


def test_reader_rejects_files_that_are_not_prediction_lists(tmp_path):
    with pytest.raises(GroundingInputError, match="expected a JSON list"):
        read_upstream_grounding_predictions(_write(tmp_path / "d.json", {"predictions": []}))
    with pytest.raises(GroundingInputError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("[{")
        read_upstream_grounding_predictions(tmp_path / "broken.json")
    with pytest.raises(GroundingInputError, match="no predictions"):
        read_upstream_grounding_predictions(_write(tmp_path / "e.json", []))


def test_missing_box_is_an_error_or_a_counted_zero(tmp_path):
    entries = [_entry([0, 0, 10, 10], [0, 0, 10, 10]), _entry([0, 0, 10, 10], None), _entry([0, 0, 10, 10], [])]
    del entries[1]["out_boxes"]
    path = _write(tmp_path / "p.json", entries)
    with pytest.raises(GroundingInputError, match=r"entry 1: no predicted box"):
        read_upstream_grounding_predictions(path)
    preds = read_upstream_grounding_predictions(path, missing="zero")
    ev = evaluate_grounding(preds)
    assert preds.num_missing == 2
    assert ev.summary.num_samples == 3 and ev.summary.num_missing == 2
    assert ev.summary.miou == pytest.approx(1 / 3) and ev.summary.success_rate == pytest.approx(1 / 3)


def test_questions_file_catches_missing_extra_and_misaligned(tmp_path):
    questions = [{"gt_box": [0, 0, 10, 10], "question": "Where is the dog?"},
                 {"gt_box": [5, 5, 10, 10], "question": "Where is the cat?"},
                 {"gt_box": [1, 1, 2, 2], "question": "Where is the cup?"}]
    qpath = _write(tmp_path / "qa.json", questions)
    good = [_entry([0, 0, 10, 10], [0, 0, 10, 10]), _entry([5, 5, 10, 10], [5, 5, 15, 15], prompt="Where is the cat? [VG]")]

    short = _write(tmp_path / "short.json", good)
    with pytest.raises(GroundingInputError, match=r"questions 2\.\.2 have no prediction"):
        read_upstream_grounding_predictions(short, questions_path=qpath)
    ev = evaluate_grounding(read_upstream_grounding_predictions(short, questions_path=qpath, missing="zero"))
    assert ev.summary.num_samples == 3 and ev.summary.num_missing == 1 and ev.summary.num_success == 2

    extra = _write(tmp_path / "extra.json", good + [_entry([1, 1, 2, 2], [1, 1, 3, 3])] * 2)
    with pytest.raises(GroundingInputError, match=r"entries 3\.\.3 are extra"):
        read_upstream_grounding_predictions(extra, questions_path=qpath)

    shifted = _write(tmp_path / "shifted.json", [good[1], good[0]])
    with pytest.raises(GroundingInputError, match=r"entry 0\.gt=.*not aligned"):
        read_upstream_grounding_predictions(shifted, questions_path=qpath)


def test_group_by_field(tmp_path):
    path = _write(tmp_path / "p.json", [_entry([0, 0, 10, 10], [0, 0, 10, 10], split="val"),
                                        _entry([0, 0, 10, 10], [50, 50, 60, 60], split="testA"),
                                        _entry([0, 0, 10, 10], [0, 0, 10, 9], split="testA")])
    ev = evaluate_grounding(read_upstream_grounding_predictions(path, group_field="split"))
    assert ev.groups["val"].success_rate == 1.0
    assert ev.groups["testA"].success_rate == 0.5 and ev.groups["testA"].num_samples == 2
    with pytest.raises(GroundingInputError, match="missing group field 'round'"):
        read_upstream_grounding_predictions(path, group_field="round")


# ------------------------------------------------------------------ reports


def test_reports_json_markdown_and_visualisation(tmp_path):
    from PIL import Image

    summary = {"miou": 0.123456789, "success_rate": 0.5, "miou_at_success": None, "num_samples": 2}
    out = write_summary_json(tmp_path / "r" / "summary.json", summary)
    assert json.loads(out.read_text()) == summary
    with pytest.raises(ValueError):
        write_summary_json(tmp_path / "nan.json", {"miou": float("nan")})
    table = markdown_table({"all": summary})
    assert table.splitlines()[0] == "| run | miou | success_rate | miou_at_success | num_samples |"
    assert table.splitlines()[2] == "| all | 0.1235 | 0.5000 | - | 2 |"

    Image.new("RGB", (64, 48), "white").save(tmp_path / "present.jpg")
    path = _write(tmp_path / "p.json", [
        _entry([1, 1, 20, 20], [2, 2, 25, 25], image_abs_path="/elsewhere/absent.jpg"),
        _entry([1, 1, 20, 20], [2, 2, 25, 25], image_abs_path="/authors/machine/present.jpg"),
    ])
    preds = read_upstream_grounding_predictions(path)
    ev = evaluate_grounding(preds)
    vis = visualize_grounding(preds.records, ev.ious.tolist(), tmp_path / "vis", num_images=5, image_root=tmp_path)
    assert len(vis.written) == 1 and vis.skipped == ["/elsewhere/absent.jpg"]
    with Image.open(vis.written[0]) as im:
        assert im.size == (64, 48)
        assert im.getpixel((1, 19)) == (0, 200, 0)  # left edge of the GT box (xyxy 1, 1, 21, 21)
        assert im.getpixel((40, 40)) == (255, 255, 255)  # outside both boxes


# ------------------------------------------------------------------ the command and the published numbers


def _run_eval_grounding(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "evaluation" / "eval_grounding.py"), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_command_reports_bad_input_clearly(tmp_path):
    path = _write(tmp_path / "p.json", [_entry([0, 0, 10, 10], [0, 0, 5, 5], score=float("nan"))])
    proc = _run_eval_grounding("--predictions", str(path))
    assert proc.returncode == 1
    assert "entry 0.score" in proc.stderr


def _record(i, image, prompt, gt, pred):
    return GroundingRecord(index=i, gt_box_xyxy_abs=gt, pred_box_xyxy_abs=pred, image_path=image, prompt=prompt)


def test_query_swap_partners_stay_on_the_image_and_change_the_question():
    records = [_record(0, "a.jpg", "Where is the dog?", (0, 0, 1, 1), None),
               _record(1, "b.jpg", "Where is the cat?", (0, 0, 1, 1), None),
               _record(2, "a.jpg", "Where is the dog?", (0, 0, 1, 1), None),  # same words: not a partner
               _record(3, "a.jpg", "Where is the cup?", (0, 0, 1, 1), None)]
    assert query_swap_partners(records) == [3, None, 3, 0]


def test_query_swap_separates_grounding_the_words_from_one_box_per_image():
    dog, cat = (0, 0, 10, 10), (50, 50, 70, 70)
    follows = [_record(0, "a.jpg", "Where is the dog?", dog, dog), _record(1, "a.jpg", "Where is the cat?", cat, cat)]
    result = evaluate_query_swap(follows)
    assert result == {"num_swappable": 2, "success_rate": 1.0, "success_rate_query_swapped": 0.0}
    same_box = [_record(0, "a.jpg", "Where is the dog?", dog, dog), _record(1, "a.jpg", "Where is the cat?", cat, dog)]
    result = evaluate_query_swap(same_box)
    assert result["success_rate"] == 0.5 and result["success_rate_query_swapped"] == 0.5
    # a missing answer is a miss in both rates; an image with one question has no partner
    lone = [_record(0, "a.jpg", "Where is the dog?", dog, None), _record(1, "a.jpg", "Where is the cat?", cat, cat),
            _record(2, "b.jpg", "Where is the cup?", dog, dog)]
    assert evaluate_query_swap(lone) == {"num_swappable": 2, "success_rate": 0.5, "success_rate_query_swapped": 0.0}


def test_shared_words_tell_a_colour_blind_model_from_one_that_reads_both_words():
    box = {"red circle": (0, 0, 10, 10), "blue circle": (20, 0, 30, 10), "red square": (40, 0, 50, 10),
           "green triangle": (60, 0, 70, 10)}
    names = list(box)

    def records(answer):
        return [_record(i, "a.jpg", f"Where is the {n}?", box[n], box[answer(n)]) for i, n in enumerate(names)]

    reads_both = evaluate_shared_words(records(lambda n: n), names)
    # word 0 (colour) shared: red circle / red square, the kind decides; word 1 (kind): the two circles
    assert reads_both == [{"word": 0, "num_questions": 2, "success_rate": 1.0, "chance": 0.5},
                          {"word": 1, "num_questions": 2, "success_rate": 1.0, "chance": 0.5}]
    # blind to the colour: every circle question gets the red circle
    colour_blind = evaluate_shared_words(records(lambda n: "red circle" if n.endswith("circle") else n), names)
    assert colour_blind[1] == {"word": 1, "num_questions": 2, "success_rate": 0.5, "chance": 0.5}
    assert colour_blind[0]["success_rate"] == 1.0  # the kind still decides red circle vs red square
    # names are looked up by record index: a short list is an error, not a silent misalignment
    with pytest.raises(ValueError, match="3 names"):
        evaluate_shared_words(records(lambda n: n), names[:3])


def test_query_swap_command_on_a_predictions_file(tmp_path):
    entries = [_entry([0, 0, 10, 10], [0, 0, 10, 10], prompt="Where is the dog? [VG]"),
               _entry([50, 50, 20, 20], [50, 50, 70, 70], prompt="Where is the cat? [VG]")]
    proc = _run_eval_grounding("--predictions", str(_write(tmp_path / "p.json", entries)), "--query-swap")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["success_rate"] == 1.0 and result["success_rate_query_swapped"] == 0.0
    assert result["num_query_swappable"] == 2


def test_reproduces_published_coco_grounding_numbers(tmp_path):
    if not COCO_PREDICTIONS.is_file():
        pytest.skip(f"reference file {COCO_PREDICTIONS} not found (set CHATTERBOX_SHARED_DIR)")
    proc = _run_eval_grounding("--predictions", str(COCO_PREDICTIONS), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_samples"] == 3422
    assert result["num_success"] == 2456
    assert result["success_rate"] == pytest.approx(2456 / 3422, abs=1e-12)
    assert result["miou"] == pytest.approx(0.6784, abs=1e-4)
    assert result["success_rate"] == pytest.approx(0.7177, abs=1e-4)
    assert result["miou_at_success"] == pytest.approx(0.9139, abs=1e-4)
    assert result["num_fallback"] == 15 and result["num_missing"] == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["num_success"] == 2456
    assert "| all | 0.6784 | 0.7177 | 0.9139 | 2456 | 3422 | 0 |" in (tmp_path / "out" / "summary.md").read_text()

    if COCO_QUESTIONS.is_file():  # the same numbers when matched against the question file
        proc = _run_eval_grounding("--predictions", str(COCO_PREDICTIONS), "--questions", str(COCO_QUESTIONS))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == result


# ------------------------------------------------------------------ referring: readers, checks, PTB step

from chatterbox.eval.caption_metrics import (  # noqa: E402
    CaptionScorer,
    ReferringInputError,
    read_referring_predictions,
    read_referring_references,
    refer_reference,
)


def _raw_entry(ref_id, text, gt=("the man in yellow coat.",)):
    return {"gt": list(gt), "ref_id": ref_id, "id": 1, "image_abs_path": "/x.jpg", "input_bbox": [[0, 0, 5, 5]],
            "prompt": "What is it <bbox>?", "text_output": text}


def test_refer_reference_rebuilds_refer_sentences():
    assert refer_reference("lady ' s head.") == "lady ' s head"
    assert refer_reference("closed m.") == "closed m"
    assert refer_reference("the pur\u00e9e bowl.") == "the pure bowl"  # ascii-ignore, as refer
    assert refer_reference("no period") == "no period"


def test_referring_readers_both_layouts(tmp_path):
    raw = _write(tmp_path / "raw.json", [_raw_entry(0, " It is a man."), _raw_entry(7, " It is a cup.", ["cup.", "a mug."])])
    assert read_referring_predictions(raw) == {"0": " It is a man.", "7": " It is a cup."}
    assert read_referring_references(raw) == {"0": ["the man in yellow coat"], "7": ["cup", "a mug"]}
    assert read_referring_references(raw, procedure="asis")["7"] == ["cup.", "a mug."]
    mod = _write(tmp_path / "mod.json", {"predictions": [{"sent": "a man", "ref_id": 0}, {"sent": "a cup", "ref_id": 7}]})
    assert read_referring_predictions(mod) == {"0": "a man", "7": "a cup"}
    mapping = _write(tmp_path / "refs.json", {"0": ["a man"], "7": ["a cup"]})
    assert read_referring_references(mapping) == {"0": ["a man"], "7": ["a cup"]}


@pytest.mark.parametrize(
    "content, message",
    [
        ({"predictions": [{"sent": "a", "ref_id": 1}, {"sent": "b", "ref_id": 1}]}, r"entry 1: duplicate ref_id '1'"),
        ({"predictions": [{"sent": None, "ref_id": 1}]}, r"entry 0\.sent: expected a string"),
        ({"predictions": [{"sent": "a"}]}, r"entry 0: missing field 'ref_id'"),
        ({"predictions": [{"sent": "a", "ref_id": 1.5}]}, r"entry 0\.ref_id: expected an int or string"),
        ({"predictions": []}, r"no predictions"),
        ({"preds": []}, r"expected upstream's raw_output list"),
    ],
)
def test_referring_prediction_errors(tmp_path, content, message):
    with pytest.raises(ReferringInputError, match=message):
        read_referring_predictions(_write(tmp_path / "p.json", content))


def test_referring_reference_errors(tmp_path):
    with pytest.raises(ReferringInputError, match=r"entry 0\.gt: expected a non-empty list of strings"):
        read_referring_references(_write(tmp_path / "r.json", [_raw_entry(0, "x", gt=[])]))
    with pytest.raises(ReferringInputError, match=r"entry 1: missing field 'gt'"):
        read_referring_references(_write(tmp_path / "r.json", [_raw_entry(0, "x"), {"ref_id": 1}]))


def test_scorer_refuses_missing_and_extra_ids_before_running_java():
    scorer = CaptionScorer()
    with pytest.raises(ReferringInputError, match=r"1 reference id\(s\) without a prediction \(first: \['b'\]\)"):
        scorer.score({"a": ["x"], "b": ["y"]}, {"a": "x"})
    with pytest.raises(ReferringInputError, match=r"1 predicted id\(s\) without references"):
        scorer.score({"a": ["x"]}, {"a": "x", "c": "z"})
    with pytest.raises(ReferringInputError, match=r"predictions\['a'\]: expected a string"):
        scorer.score({"a": ["x"]}, {"a": 3})
    assert scorer._meteor is None  # no Java process was started


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="no Java runtime for the PTB tokenizer")
def test_ptb_step_and_scorers_without_meteor():
    refs = {"a": ["A red truck.", "the truck"], "b": ["a man in blue"], "c": ["dog on the left"]}
    gts, res = CaptionScorer.tokenize(refs, {"a": " It is a red truck.", "b": "", "c": "A dog , left!"})
    assert gts["a"] == ["a red truck", "the truck"]
    assert res == {"a": ["it is a red truck"], "b": [""], "c": ["a dog left"]}  # lower case, punctuation gone
    exact = CaptionScorer(with_meteor=False).score(refs, {"a": "a red truck", "b": "a man in blue", "c": "dog on the left"},
                                                   per_item=True)
    assert "METEOR" not in exact
    assert exact["Bleu_1"] == pytest.approx(1.0, abs=1e-8) and exact["ROUGE_L"] == pytest.approx(1.0)
    assert exact["per_item"]["ROUGE_L"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    worse = CaptionScorer(with_meteor=False).score(refs, {"a": "a truck", "b": "a woman", "c": "cat"})
    assert all(worse[k] < exact[k] for k in ("Bleu_1", "ROUGE_L", "CIDEr"))


def test_referring_command_rejects_mismatched_ids(tmp_path):
    raw = _write(tmp_path / "raw.json", [_raw_entry(0, "a"), _raw_entry(1, "b")])
    preds = _write(tmp_path / "p.json", {"predictions": [{"sent": "a", "ref_id": 0}]})
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "evaluation" / "eval_referring.py"),
                           "--predictions", str(preds), "--references", str(raw)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "1 reference id(s) without a prediction (first: ['1'])" in proc.stderr
