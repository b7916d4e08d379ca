"""chatterbox.data.processor: the one path from (dialogue, image, boxes) to model inputs."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from chatterbox.conversation import ASSISTANT, IGNORE_INDEX, USER, Message
from chatterbox.data.errors import DataError
from chatterbox.data.processor import Processor

QUESTION_1 = "<image>\n What is <bbox>?"
REPLY_1 = "It is a red circle."
QUESTION_2 = "Where is the blue square? [VG]"


def test_a_generation_prompt_is_the_training_tokens_before_the_reply(tiny_tokenizer):
    processor = Processor(tiny_tokenizer)
    prompt = processor.prompt_ids([Message(USER, QUESTION_1)])
    trained = processor.dialogue([Message(USER, QUESTION_1), Message(ASSISTANT, REPLY_1)], "test#0")
    assert prompt[0] == processor.ids.bos and prompt.count(processor.ids.bbox) == 1
    assert trained.input_ids[:len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in trained.labels[:len(prompt)])
    assert any(label != IGNORE_INDEX for label in trained.labels[len(prompt):])


def test_the_next_round_continues_a_dialogue_as_training_tokenises_it(tiny_tokenizer):
    processor = Processor(tiny_tokenizer)
    first = processor.prompt_ids([Message(USER, QUESTION_1)])
    reply = processor.encode(" " + REPLY_1)
    both = processor.prompt_ids([Message(USER, QUESTION_1), Message(ASSISTANT, REPLY_1), Message(USER, QUESTION_2)])
    assert first + reply + processor.next_round_ids(QUESTION_2) == both


def test_images_follow_the_configured_resize_and_boxes_are_checked(tiny_tokenizer):
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    per_source = Processor(tiny_tokenizer, clip_image_size=112, dino_image_size=128)
    squash = Processor(tiny_tokenizer, clip_image_size=112, dino_image_size=128, clip_resize="squash")
    assert per_source.clip_input(image, "crop").geometry.mode == "crop"
    assert per_source.clip_input(image, "squash").geometry.mode == "squash"
    clip = squash.clip_input(image, "crop")
    assert clip.geometry.mode == "squash" and clip.image_clip.shape == (3, 112, 112) and clip.size_hw == (100, 200)
    assert squash.dino_input(image).shape == (3, 128, 128)
    boxes = squash.region_boxes([[50, 25, 150, 75]], clip, "file.json#3")
    torch.testing.assert_close(boxes, torch.tensor([[0.25, 0.25, 0.75, 0.75]]))
    assert squash.region_boxes([], clip, "file.json#3").shape == (0, 4)
    with pytest.raises(DataError, match=r"file\.json.*3.*region boxes"):
        squash.region_boxes([[50, 25, 250, 75]], clip, "file.json#3")
