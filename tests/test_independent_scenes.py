"""evaluation/independent_scenes.py: its own scenes are well posed, its controls separate a model that reads
the words from one that does not, and it runs through the notebook API against a tiny export."""
from __future__ import annotations

import colorsys
import json
import random
import re
import sys

import pytest
import torch
from chat_support import build_tiny_chat_model

from chatterbox.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "evaluation"))
import independent_scenes as I  # noqa: E402


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(7)
    return [I.draw_scene(rng) for _ in range(40)]


def test_scenes_are_well_posed(scenes):
    assert {s.background for s in scenes} == set(I.BACKGROUNDS)
    for scene in scenes:
        names = [s.name for s in scene.shapes]
        assert 2 <= len(names) <= 4 and len(set(names)) == len(names)
        w, h = scene.image.size
        for i, shape in enumerate(scene.shapes):
            x1, y1, x2, y2 = shape.box_xyxy_abs
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert all(I._apart(shape.box_xyxy_abs, o.box_xyxy_abs) for o in scene.shapes[i + 1:])
            # the middle of the box is painted in the named colour
            r, g, b = scene.image.getpixel(((x1 + x2) // 2, (y1 + y2) // 2))
            hue, saturation, _ = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
            distance = abs((hue * 360 - I.HUE_CENTRES[shape.colour] + 180) % 360 - 180)
            assert saturation > 0.5 and distance <= 8, (shape.name, (r, g, b))


class ScriptedModel:
    """Answers from the truth of the scenes it is given: ``reads_words`` False always points at the
    largest shape and names it, whatever the question says."""

    def __init__(self, scenes, reads_words: bool):
        self.by_image = {id(s.image): s for s in scenes}
        self.reads_words = reads_words

    def chat_session(self, image):
        scene, reads_words = self.by_image[id(image)], self.reads_words

        class Session:
            def ask(self, question, boxes=None, ground=False):
                largest = max(scene.shapes, key=lambda s: s.area)
                if boxes is not None:
                    shape = next(s for s in scene.shapes if list(s.box_xyxy_abs) == boxes[0]) if reads_words else largest
                    return type("Reply", (), {"text": f"It is a {shape.name}.", "boxes_xyxy_abs": torch.zeros(0, 4)})
                name = re.match(r"Where is the (\w+ \w+)\?", question).group(1)
                shape = next(s for s in scene.shapes if s.name == name) if reads_words else largest
                return type("Reply", (), {"text": "", "boxes_xyxy_abs": torch.tensor([shape.box_xyxy_abs], dtype=torch.float)})

        return Session()


def test_the_controls_tell_reading_the_words_from_not(scenes):
    reader, _ = I.evaluate(ScriptedModel(scenes, True), scenes, "What is it <bbox>?")
    assert reader["grounding_success_rate"] == 1 and reader["grounding_success_rate_other_name"] == 0
    assert reader["referring_accuracy"] == 1
    blind, _ = I.evaluate(ScriptedModel(scenes, False), scenes, "What is it <bbox>?")
    assert blind["grounding_success_rate"] == pytest.approx(blind["grounding_success_rate_largest_shape"])
    assert blind["grounding_success_rate_other_name"] > 0.5 * blind["grounding_success_rate"]
    assert blind["referring_accuracy"] == pytest.approx(blind["grounding_success_rate_largest_shape"])
    assert blind["grounding_chance"] == reader["grounding_chance"] < 0.5


def test_it_runs_through_the_notebook_api(tiny_tokenizer, tmp_path):
    export = build_tiny_chat_model(tiny_tokenizer).save_pretrained(tmp_path / "export")
    assert I.main(["--config", "tiny_stage2", "--checkpoint", str(export), "--num-scenes", "2",
                   "--output-dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert summary["questions"] == len(records) >= 4
    assert all(len(r["predicted_box"]) == 4 and isinstance(r["reply"], str) for r in records)
    assert (tmp_path / "out" / "grounding.png").is_file()
