"""Runner options: RefCOCO / RefCOCO+ referring question sets, --visualize, optional BERTScore.

CPU only: the tiny preset with random weights and the small synthetic corpus; the runners are called
in-process through their main(argv).
"""
from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from chatterbox.data.errors import DataError
from chatterbox.eval import questions as Q

REPO = Path(__file__).resolve().parent.parent
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs Java")


def _load_runner(name: str):
    spec = importlib.util.spec_from_file_location(f"evaluation_{name}", REPO / "evaluation" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ referring question sets (upstream's refcoco{,+}_referring_conversation.py)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sentence, answer", [
    ("man on left", "It is a man on left."),
    ("the man on left", "It is man on left ."),  # the leading word goes, every word keeps a trailing space
    ("this guy", "It is guy ."),
    ("that", "It is ."),
    ("a red car", "It is red car ."),
    ("An apple", "It is a An apple."),  # only the exact lower-case words are dropped, as upstream
    ("theater seat", "It is a theater seat."),
])
def test_refcoco_it_is_answer(sentence, answer):
    assert Q.refcoco_it_is_answer(sentence) == answer


def _write_refs(folder: Path, split_by: str, refs: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 64, "height": 48}],
        "annotations": [{"id": 50, "image_id": 5, "category_id": 1, "bbox": [10.7, 5.2, 20.6, 30.9]},
                        {"id": 51, "image_id": 5, "category_id": 1, "bbox": [40.0, 1.0, 20.0, 20.0]}],
        "categories": [{"id": 1, "name": "person"}]}))
    with open(folder / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)


def _refs():
    common = {"image_id": 5, "category_id": 1}
    return [
        {**common, "ref_id": 7, "ann_id": 50, "split": "testA", "file_name": "COCO_train2014_000000000005_50.jpg",
         "sentences": [{"sent": "the man on left"}, {"sent": "Guy In Red"}]},
        {**common, "ref_id": 8, "ann_id": 51, "split": "testB", "file_name": "COCO_train2014_000000000005_51.jpg",
         "sentences": [{"sent": "woman right"}]},
        {**common, "ref_id": 9, "ann_id": 51, "split": "train", "file_name": "COCO_train2014_000000000005_51.jpg",
         "sentences": [{"sent": "x"}]},
    ]


def test_refcoco_referring_questions_as_upstream(tmp_path):
    folder = tmp_path / "refcoco"
    _write_refs(folder, "unc", _refs())
    by_split = Q.referring_questions(str(folder / "refs(unc).p"), str(folder / "instances.json"), "refcoco")
    assert sorted(by_split) == ["testA", "testB", "train"]
    a = by_split["testA"][0]
    assert a["question"] == "What is in this region <bbox>?[[10, 5, 31, 36]]"
    assert a["answer"] == "It is man on left ."  # one string, from the first sentence only
    assert a["ref_id"] == 7 and by_split["testB"][0]["answer"] == "It is a woman right."
    items = Q.referring_items(by_split["testA"], "/coco", "Please answer.", source="refcoco_testA.json")
    assert items[0].user_text == "What is in this region <bbox>?Please answer."
    assert items[0].references == ["It is man on left ."]
    assert items[0].region_boxes_xyxy_abs == [(10.0, 5.0, 31.0, 36.0)]
    assert items[0].image_path == "/coco/COCO_train2014_000000000005.jpg"
    assert items[0].item_id == "refcoco_testA.json#0"


def test_refcoco_plus_referring_questions_as_refcocog(tmp_path):
    folder = tmp_path / "refcoco+"
    _write_refs(folder, "unc", _refs())
    by_split = Q.referring_questions(str(folder / "refs(unc).p"), str(folder / "instances.json"), "refcoco+")
    a = by_split["testA"][0]
    assert a["question"] == "What is it <bbox>?[[10, 5, 31, 36]]"
    assert a["answer"] == ["the man on left.", "guy in red."]


def test_referring_questions_bad_input(tmp_path):
    folder = tmp_path / "refcoco"
    refs = _refs()
    refs[1]["sentences"] = [{"sent": ""}]
    _write_refs(folder, "unc", refs)
    with pytest.raises(DataError) as e:
        Q.referring_questions(str(folder / "refs(unc).p"), str(folder / "instances.json"), "refcoco")
    assert e.value.record == 1 and e.value.field == "sentences[0].sent" and "refs(unc).p" in e.value.file
    with pytest.raises(ValueError, match="dataset must be one of"):
        Q.referring_questions(str(folder / "refs(unc).p"), str(folder / "instances.json"), "refclef")
    record = {"question": "What is it <bbox>?[[1, 2, 3, 4]]", "answer": "", "ref_id": 1, "file_name": "a.jpg"}
    with pytest.raises(DataError) as e:
        Q.referring_items([record], "/x", "")
    assert e.value.field == "answer"


# ----------------------------------------------------------------------------------------------
# The runners with the tiny model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from chatterbox.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("synthetic") / "data"
    return write_corpus(root, num_images=8, seed=3)


def _common(corpus, out: Path, *extra: str) -> list[str]:
    sets = []
    for key, value in corpus.data_paths().items():
        sets += ["--set", f"data.paths.{key}={value}"]
    return ["--config", "tiny_stage1", *sets, "--set", "eval.max_new_tokens=4", "--device", "cpu",
            "--batch-size", "2", "--output-dir", str(out), *extra]


def _check_pngs(folder: Path, count: int) -> list[Path]:
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == count
    with Image.open(pngs[0]) as im:
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (0, 200, 0) in colours  # the GT box is drawn
    return pngs


def test_coco_grounding_visualize(tmp_path, corpus, capsys):
    out = tmp_path / "coco"
    assert _load_runner("coco_grounding").main(_common(corpus, out, "--limit", "3", "--visualize", "2")) == 0
    printed = capsys.readouterr().out
    assert _last_json(printed)["num_samples"] == 3  # the metrics JSON stays the last line
    assert "visualisations: 2 written" in printed
    names = [p.name for p in _check_pngs(out / "visualizations", 2)]
    assert names == ["grounding_000000.png", "grounding_000001.png"]


def test_rec_visualize_and_no_visualize_by_default(tmp_path, corpus, capsys):
    rec = _load_runner("rec")
    out = tmp_path / "rec"
    assert rec.main(_common(corpus, out, "--dataset", "refcoco", "--limit", "3", "--visualize", "5")) == 0
    assert _last_json(capsys.readouterr().out)["accuracy"]
    _check_pngs(out / "visualizations", 3)  # no more than there are predictions
    plain = tmp_path / "rec_plain"
    assert rec.main(_common(corpus, plain, "--dataset", "refcoco", "--limit", "2")) == 0
    assert not (plain / "visualizations").exists()
    with pytest.raises(SystemExit):
        rec.parse_args(["--config", "tiny_stage1", "--dataset", "refcoco", "--visualize", "-1"])


@needs_java
def test_cb_mrg_visualize_draws_vg_rounds(tmp_path, corpus, capsys):
    out = tmp_path / "mrg"
    args = _common(corpus, out, "--limit", "2", "--max-rounds", "2", "--no-meteor", "--visualize", "3")
    assert _load_runner("cb_mrg").main(args) == 0
    result = _last_json(capsys.readouterr().out)
    num_vg = result["grounding"]["num_samples"]
    assert num_vg >= 1
    _check_pngs(out / "visualizations", min(3, num_vg))


def _fake_bert_score(monkeypatch, model_dir: Path, calls: list):
    """A stand-in bert_score package whose English model is a folder on disk (so nothing can be fetched)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text("{}")
    import torch

    def score(cands, refs, **kwargs):
        calls.append((list(cands), list(refs), kwargs))
        f1 = torch.tensor([0.5 + 0.1 * (c == "") for c in cands])
        return f1, f1, f1

    package = types.ModuleType("bert_score")
    package.score = score
    utils = types.ModuleType("bert_score.utils")
    utils.lang2model = {"en": str(model_dir)}
    package.utils = utils
    monkeypatch.setitem(sys.modules, "bert_score", package)
    monkeypatch.setitem(sys.modules, "bert_score.utils", utils)


@needs_java
def test_refcoco_referring_runner_with_and_without_bertscore(tmp_path, corpus, capsys, monkeypatch):
    runner = _load_runner("refcocog_referring")
    monkeypatch.setitem(sys.modules, "bert_score", None)  # not installed: an explicit "unavailable" entry
    out = tmp_path / "refcoco"
    args = _common(corpus, out, "--dataset", "refcoco", "--split", "testB", "--no-meteor", "--bertscore")
    assert runner.main(args) == 0
    printed = capsys.readouterr().out
    result = _last_json(printed)
    assert result["BERTScore_F1"] is None and "not installed" in result["bertscore_unavailable"]
    assert "BERTScore unavailable:" in printed and result["CIDEr"] >= 0
    raw = json.loads((out / "refcoco_testB.json").read_text())
    questions = json.loads((out / "testB.json").read_text())
    assert len(raw) == len(questions) == result["num_refs"] > 0
    assert all(e["prompt"] == "What is in this region <bbox>?" and len(e["gt"]) == 1 for e in raw)
    assert raw[0]["gt"] == [questions[0]["answer"]] and raw[0]["gt"][0].startswith("It is ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split_by"] == "unc" and summary["benchmark"] == "refcoco_referring"

    calls = []
    _fake_bert_score(monkeypatch, tmp_path / "roberta", calls)
    assert runner.main(args) == 0  # resumes every prediction; only the scores are recomputed
    with_bert = _last_json(capsys.readouterr().out)
    assert "bertscore_unavailable" not in with_bert
    (cands, refs, kwargs), = calls
    assert kwargs == {"lang": "en"} and refs == [" And ".join(e["gt"]) for e in raw]
    assert cands == [e["text_output"] for e in raw]
    assert with_bert["BERTScore_F1"] == pytest.approx(sum(0.5 + 0.1 * (c == "") for c in cands) / len(cands))
    assert {k: v for k, v in with_bert.items() if k != "BERTScore_F1"} == \
        {k: v for k, v in result.items() if k not in ("BERTScore_F1", "bertscore_unavailable")}


def test_referring_runner_split_must_belong_to_the_dataset():
    runner = _load_runner("refcocog_referring")
    with pytest.raises(SystemExit):
        runner.parse_args(["--config", "tiny_stage1", "--dataset", "refcocog", "--split", "testA"])
    assert runner.parse_args(["--config", "tiny_stage1", "--dataset", "refcoco+"]).split == "testA"
    assert runner.parse_args(["--config", "tiny_stage1"]).split == "test"


@needs_java
def test_refcoco_plus_runner_scores_every_sentence(tmp_path, corpus, capsys):
    out = tmp_path / "refcoco+"
    args = _common(corpus, out, "--dataset", "refcoco+", "--split", "val", "--no-meteor")
    assert _load_runner("refcocog_referring").main(args) == 0
    result = _last_json(capsys.readouterr().out)
    raw = json.loads((out / "refcoco+_val.json").read_text())
    assert result["num_refs"] == len(raw) and "BERTScore_F1" not in result
    assert all(e["prompt"] == "What is it <bbox>?" and len(e["gt"]) == 2 for e in raw)


def test_runners_without_caption_metrics_need_no_pycocoevalcap(tmp_path, corpus, capsys, monkeypatch):
    """--no-caption-metrics: the accuracies and the prediction files, no BLEU/METEOR/CIDEr (no Java needed)."""
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # any import of it fails
    out = tmp_path / "refcocog"
    args = _common(corpus, out, "--dataset", "refcocog", "--split", "val", "--no-caption-metrics")
    assert _load_runner("refcocog_referring").main(args) == 0
    result = _last_json(capsys.readouterr().out)
    assert not {"Bleu_1", "METEOR", "CIDEr"} & set(result)
    raw = json.loads((out / "refcocog_val.json").read_text())
    assert result["num_refs"] == len(raw) > 0 and 0 <= result["name_accuracy"] <= 1

    out = tmp_path / "mrg"
    args = _common(corpus, out, "--limit", "2", "--max-rounds", "2", "--no-caption-metrics")
    assert _load_runner("cb_mrg").main(args) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["grounding"]["num_samples"] >= 1
    assert result["referring"] == {"num_samples": result["referring"]["num_samples"], "skipped": "no caption scorer"}
    assert (out / "predictions.jsonl").read_text().count("\n") == 2


def test_a_runner_does_not_resume_another_models_predictions(tmp_path, corpus, capsys):
    """Two models into one output folder: the second is refused instead of reporting the first's results."""
    rec = _load_runner("rec")
    out = tmp_path / "rec"
    assert rec.main(_common(corpus, out, "--dataset", "refcoco", "--limit", "2", "--seed", "0")) == 0
    first = (out / "predictions.jsonl").read_bytes()
    with pytest.raises(DataError, match=r"written by another run \(differs in seed: 0 then, 1 now\)"):
        rec.main(_common(corpus, out, "--dataset", "refcoco", "--limit", "2", "--seed", "1"))
    assert (out / "predictions.jsonl").read_bytes() == first
    assert rec.main(_common(corpus, out, "--dataset", "refcoco", "--limit", "2", "--seed", "0")) == 0
    assert "2 resumed" in capsys.readouterr().out
