"""One processor from (dialogue, image, region boxes) to model inputs, for training data, evaluation and chat.

As a transformers Processor serves both training and generation, :class:`Processor` is the one place that
renders the prompt format into token ids (a whole dialogue with labels, a generation prompt, or the next
round of a running chat) and prepares an image and its `<bbox>` boxes for CLIP and the vision branch.
``SampleEncoder`` (training), ``RequestEncoder`` (evaluation) and ``ChatSession`` (chat) add only what is
theirs: truncation and grounding targets, batching, the KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from chatterbox.conversation import (ASSISTANT, USER, VICUNA_V1_1, Message, TokenizedConversation, generation_prompt,
                                     render, tokenize_conversation)
from chatterbox.data.transforms import (ClipGeometry, clip_image, clip_resize_mode, dino_image,
                                        region_boxes_from_pixels)
from chatterbox.tokens import NUM_IMAGE_PATCHES, expand_image_placeholder, special_token_ids

__all__ = ["ClipInput", "Processor"]


@dataclass(frozen=True)
class ClipInput:
    """An image as the CLIP tower sees it, and the geometry that maps its boxes."""

    image_clip: torch.Tensor  # [3, S, S], CLIP mean/std
    geometry: ClipGeometry
    size_hw: tuple[int, int]  # of the original image


class Processor:
    """Token ids and image tensors for one tokenizer and one data config (``DataConfig``)."""

    def __init__(self, tokenizer, clip_image_size: int = 224, dino_image_size: int = 512,
                 region_box_normalisation: str = "crop", num_image_patches: int = NUM_IMAGE_PATCHES,
                 clip_resize: str = "per_source"):
        self.tokenizer = tokenizer
        self.ids = special_token_ids(tokenizer)
        self.clip_image_size = clip_image_size
        self.dino_image_size = dino_image_size
        self.region_box_normalisation = region_box_normalisation
        self.num_image_patches = num_image_patches
        self.clip_resize = clip_resize  # "squash": every image squashed, whatever its source's mode

    @classmethod
    def from_config(cls, tokenizer, data_cfg) -> "Processor":
        return cls(tokenizer, data_cfg.clip_image_size, data_cfg.dino_image_size, data_cfg.region_box_normalisation,
                   data_cfg.num_image_patches, data_cfg.clip_resize)

    # ------------------------------------------------------------------------------------------------
    # text
    def dialogue(self, messages: Sequence[Message], where: str) -> TokenizedConversation:
        """A whole dialogue (user/assistant alternating) -> ids, labels on the replies, round ends."""
        return tokenize_conversation(self.tokenizer, messages, where=where, num_image_patches=self.num_image_patches)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """BOS + the dialogue so far + "ASSISTANT:", the image placeholder expanded: what generation starts from."""
        text = expand_image_placeholder(generation_prompt(messages), self.num_image_patches)
        return [self.ids.bos] + self.encode(text)

    def next_round_ids(self, question: str) -> list[int]:
        """The ids a running dialogue continues with for a new user turn: the "</s>" that closes the last
        reply, then "USER: <question> ASSISTANT:" (raises ConversationError for a malformed question).

        The text after a closed assistant turn does not depend on the history, so it is rendered after a
        placeholder exchange."""
        placeholder = [Message(USER, "q"), Message(ASSISTANT, "a")]
        closed = render(placeholder).text
        opened = generation_prompt(placeholder + [Message(USER, question)])
        sep2 = VICUNA_V1_1.sep2
        assert closed.endswith(sep2) and opened.startswith(closed)
        ids = self.encode(sep2 + opened[len(closed):])
        if not ids or ids[0] != self.ids.eos:
            raise RuntimeError(f"the tokenizer does not encode {sep2!r} as its end-of-sequence token "
                               f"{self.ids.eos}: {ids[:3]}")
        return ids

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------------------------------------
    # image and boxes
    def clip_input(self, image: Image.Image, source_resize: str = "crop") -> ClipInput:
        """The CLIP input of ``image``: squashed where the config says so, else in its source's mode
        (``source_resize``). Raises transforms.ImageShapeError for an image too thin to centre-crop."""
        mode = clip_resize_mode(self.clip_resize, source_resize)
        image_clip, geometry = clip_image(image, self.clip_image_size, mode)
        return ClipInput(image_clip, geometry, (image.height, image.width))

    def dino_input(self, image: Image.Image) -> torch.Tensor:
        """The vision branch's input [3, D, D]."""
        return dino_image(image, self.dino_image_size)

    def region_boxes(self, boxes_xyxy_abs, clip: ClipInput, where: str) -> torch.Tensor:
        """`<bbox>` boxes in original-image pixels (possibly none) -> [n, 4] xyxy normalised to the CLIP
        input; a box outside the image is a DataError naming ``where`` ("file#record")."""
        height, width = clip.size_hw
        return region_boxes_from_pixels(boxes_xyxy_abs, width, height, clip.geometry, self.region_box_normalisation,
                                        where)
