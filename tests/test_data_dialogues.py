"""Box-group parsing, dialogue building, label masking across rounds and truncation at round boundaries."""
from __future__ import annotations

import random

import pytest
import torch

from chatterbox.conversation import IGNORE_INDEX
from chatterbox.data import dialogues as D
from chatterbox.data.annotations import AnnotationError, split_box_group, strip_box_groups
from chatterbox.data.pipeline import SampleEncoder
from chatterbox.data.records import DialogueRecord, DialogueTurn, NamedBox, Sample, Turn
from chatterbox.tokens import special_token_ids

from data_support import synthetic_corpus


def test_box_group_parsing():
    p = split_box_group("What is on the man? <man:[12, 40.5, 88, 200], hat_2:[1,2,3,4]>")
    assert p.text == "What is on the man?"
    assert [b.name for b in p.boxes] == ["man", "hat_2"]
    assert p.boxes[0].box_xyxy_abs == (12.0, 40.5, 88.0, 200.0)
    # xywh files are converted to xyxy
    assert split_box_group("x <a:[10, 20, 5, 6]>", "xywh").boxes[0].box_xyxy_abs == (10.0, 20.0, 15.0, 26.0)
    # placeholders are not box groups, and the last character is kept when there is no group
    assert split_box_group("What is <it> doing?").text == "What is <it> doing?"
    assert split_box_group("No group here").text == "No group here"
    # upstream's known "no box" forms
    for bad in ("<man:[0,0,0,0]>", "<man:[x1, y1, x2, y2]>", "<man:[]>", "<man:[1,2,3,4]; dog:[1,2,3,4]>",
                "<man:[?, ?, ?, ?]>", "<man:[1, 2, 3, 4], dog:[0, 0, 0, 0]>"):
        p = split_box_group("Q " + bad)
        assert p.unusable_group and p.boxes == [] and p.text == "Q"
    # the markers count in the coordinates only: a name may contain them (upstream dropped these boxes)
    p = split_box_group("Q <box1:[1, 2, 3, 4], what?:[5, 6, 7, 8], taxi_0:[0, 0, 9, 9]>")
    assert not p.unusable_group and [b.name for b in p.boxes] == ["box1", "what?", "taxi_0"]
    for broken in ("<man:[1, 2, 3]>", "<man:(1, 2, 3, 4)>", "<man:[1, 2, 3, 4]]>", "<[1, 2, 3, 4]>"):
        with pytest.raises(AnnotationError):
            split_box_group("Q " + broken)
    assert strip_box_groups("The dog <dog:[1, 2, 3, 4]> is near <it>.") == "The dog is near <it>."


def _dialogue_record(n_rounds, answer_boxes_per_round):
    turns = []
    for i in range(n_rounds):
        boxes = [NamedBox(f"obj{i}_{j}", (i, j, i + 10, j + 10)) for j in range(answer_boxes_per_round[i])]
        turns.append(DialogueTurn(question=f"Question {i}?", answer=f"Answer {i}.", answer_boxes=boxes))
    return DialogueRecord(file="f.json", index=0, image_path="x.jpg", turns=turns)


def test_chain_grounding_picks_first_single_box_answer_after_start():
    record = _dialogue_record(6, [2, 1, 0, 1, 3, 1])
    for seed in range(50):
        sample = D.build_chain_grounding(record, random.Random(seed), D.BuildOptions())
        sample.check()
        target_turn = sample.turns[-1]
        assert target_turn.user.endswith(" [VG]")
        assert len(target_turn.grounding_boxes_xyxy_abs) == 1
        assert all(t.grounding_boxes_xyxy_abs is None for t in sample.turns[:-1])
        round_index = int(target_turn.user.split("Question ")[1][0])
        assert round_index in (1, 3, 5)
        first_round = int(sample.turns[0].user.split("Question ")[1][0])
        # no single-box round is skipped between the start and the target
        assert not [r for r in (1, 3, 5) if first_round <= r < round_index]
    logic = D.build_chain_grounding(record, random.Random(0), D.BuildOptions(), logic=True)
    assert len(logic.turns) == 2  # LC: no random start, stops at round 1
    assert D.build_chain_grounding(_dialogue_record(2, [0, 2]), random.Random(0), D.BuildOptions()) is None


def test_chain_grounding_all_rounds_targets_every_single_box_answer_from_the_start():
    record = _dialogue_record(6, [2, 1, 0, 1, 3, 1])
    options = D.BuildOptions(grounding_rounds="all")
    for seed in range(20):
        sample = D.build_chain_grounding(record, random.Random(seed), options)
        sample.check()
        first_round = int(sample.turns[0].user.split("Question ")[1][0])
        targets = [int(t.user.split("Question ")[1][0]) for t in sample.turns if t.grounding_boxes_xyxy_abs]
        assert targets == [r for r in (1, 3, 5) if r >= first_round]
        for t in sample.turns:
            assert t.user.endswith(" [VG]") == (t.grounding_boxes_xyxy_abs is not None)
        assert sample.turns[-1].grounding_boxes_xyxy_abs is not None  # nothing after the last target


def test_cb_referring_records_every_box_of_placeholder_turns():
    turns = [DialogueTurn("Who is near the tree?", "A man.", [NamedBox("tree", (1, 1, 5, 5))], []),
             DialogueTurn("What are <it> holding?", "Umbrellas.",
                          [NamedBox("man", (1, 1, 9, 9)), NamedBox("woman", (2, 2, 8, 8))], [])]
    record = DialogueRecord("f.json", 0, "x.jpg", turns)
    sample = D.build_cb_referring(record, random.Random(0), D.BuildOptions(region_name_replace_prob=0.0), False)
    sample.check()
    last = sample.turns[-1]
    assert last.user.endswith("What are it <bbox> <bbox> holding?")
    assert last.region_boxes_xyxy_abs == [(1, 1, 9, 9), (2, 2, 8, 8)]
    # name replacement branch (CB-MRG) puts <bbox> where the name was and rewrites the answer
    sample = D.build_cb_referring(DialogueRecord("f.json", 0, "x.jpg", turns[:1]), random.Random(0),
                                  D.BuildOptions(region_name_replace_prob=1.0), True)
    assert sample.turns[0].user.endswith("Who is near the region <bbox>?") or \
        sample.turns[0].user.endswith("Who is near this region <bbox>?")
    assert sample.turns[0].region_boxes_xyxy_abs == [(1, 1, 5, 5)]


def _multi_round_sample(n_rounds, vg_round=None):
    turns = []
    for i in range(n_rounds):
        user = ("<image>\n " if i == 0 else "") + f"Where is the red circle number {i} <bbox>?"
        targets = None
        if i == vg_round:
            user += " [VG]"
            targets = [(10.0, 10.0, 30.0, 40.0)]
        turns.append(Turn(user, f"It is at the top left, answer {i}.", [(i + 1.0, 2.0, i + 20.0, 30.0)], targets))
    image = next(s for s in synthetic_corpus().scenes if s.split == "train")
    path = str(synthetic_corpus().root / "MSCOCO2017" / "train2017" / f"{image.image_id:012d}.jpg")
    return Sample("mem.json#0", path, "grounding" if vg_round is not None else "referring", turns, "squash")


def test_labels_supervise_only_assistant_replies_in_every_round(tiny_tokenizer):
    encoder = SampleEncoder(tiny_tokenizer)
    enc = encoder.encode(_multi_round_sample(3))
    supervised = enc.labels != IGNORE_INDEX
    text = tiny_tokenizer.decode(enc.input_ids[supervised])
    for i in range(3):
        assert f"It is at the top left, answer {i}." in text
    assert "Where is" not in text and "USER" not in text and "ASSISTANT" not in text
    assert text.count("</s>") == 3
    assert enc.labels[0] == IGNORE_INDEX  # BOS
    assert torch.equal(enc.labels[supervised], enc.input_ids[supervised])


def test_truncation_drops_whole_rounds_with_their_boxes(tiny_tokenizer):
    ids = special_token_ids(tiny_tokenizer)
    full = SampleEncoder(tiny_tokenizer).encode(_multi_round_sample(5))
    assert full.num_rounds == 5 and len(full.region_boxes_xyxy_clip_norm) == 5
    limit = len(full.input_ids) - 5  # cuts into the last round
    cut = SampleEncoder(tiny_tokenizer, max_length=limit).encode(_multi_round_sample(5))
    assert cut.truncated and cut.num_rounds == 4
    assert len(cut.input_ids) <= limit
    assert int((cut.input_ids == ids.bbox).sum()) == len(cut.region_boxes_xyxy_clip_norm) == 4
    assert torch.equal(cut.region_boxes_xyxy_clip_norm, full.region_boxes_xyxy_clip_norm[:4])
    assert cut.input_ids[-1] == tiny_tokenizer.eos_token_id  # ends with a complete round
    assert torch.equal(cut.input_ids, full.input_ids[: len(cut.input_ids)])
    # the [VG] round must survive truncation for a grounding sample
    from chatterbox.data.errors import DataError
    with pytest.raises(DataError, match="VG"):
        SampleEncoder(tiny_tokenizer, max_length=limit).encode(_multi_round_sample(5, vg_round=4))
    kept = SampleEncoder(tiny_tokenizer, max_length=limit).encode(_multi_round_sample(5, vg_round=1))
    assert len(kept.grounding_targets_cxcywh_norm) == 1 and int((kept.input_ids == ids.vg).sum()) == 1
    with pytest.raises(DataError, match="first round"):
        SampleEncoder(tiny_tokenizer, max_length=50).encode(_multi_round_sample(2))


def test_clip_resize_squash_overrides_each_sources_crop(tiny_tokenizer):
    """data.clip_resize=squash: a sample its source would centre-crop is squashed, so a region at the
    image border stays in view, and its <bbox> is normalised to the whole image."""
    from dataclasses import replace

    from chatterbox.data.transforms import clip_image, load_image

    sample = replace(_multi_round_sample(1), clip_resize="crop")
    image = load_image(sample.image_path, sample.sample_id)
    width, height = image.size
    assert width != height  # a crop would cut part of this image off
    cropped = SampleEncoder(tiny_tokenizer).encode(sample)
    squashed = SampleEncoder(tiny_tokenizer, clip_resize="squash").encode(sample)
    assert torch.equal(squashed.image_clip, clip_image(image, 224, "squash")[0])
    assert torch.equal(cropped.image_clip, clip_image(image, 224, "crop")[0])
    x1, y1, x2, y2 = sample.turns[0].region_boxes_xyxy_abs[0]
    torch.testing.assert_close(squashed.region_boxes_xyxy_clip_norm[0],
                               torch.tensor([x1 / width, y1 / height, x2 / width, y2 / height]))
