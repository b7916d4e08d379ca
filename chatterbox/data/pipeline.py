"""From a built `Sample` to model-ready tensors: the processor's tokenisation and image preparation, then
truncation, grounding targets and checks.

`SampleEncoder.encode` returns an `EncodedSample`; `collate.collate_samples` stacks them into the batch
of the batch contract. Over-long dialogues are cut at a round boundary (never between a `<bbox>` /
`[VG]` and its boxes): whole rounds are dropped from the end, together with their boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatterbox.conversation import ASSISTANT, USER, Message
from chatterbox.data.errors import DataError
from chatterbox.data.processor import Processor
from chatterbox.data.records import Sample
from chatterbox.data.transforms import (ImageShapeError, SquashAugment, check_boxes_in_image,
                                        grounding_targets_for_model, load_image)
from chatterbox.tokens import NUM_IMAGE_PATCHES


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # [T] long, BOS first
    labels: torch.Tensor  # [T] long, IGNORE_INDEX outside assistant replies
    image_clip: torch.Tensor  # [3, 224, 224]
    image_dino: torch.Tensor | None  # [3, 512, 512] when the sample has grounding targets
    region_boxes_xyxy_clip_norm: torch.Tensor  # [n, 4], one row per <bbox> token
    grounding_targets_cxcywh_norm: list[torch.Tensor]  # one [k, 4] per [VG] token
    image_size_hw: tuple[int, int]
    task: str
    sample_id: str
    num_rounds: int
    num_rounds_dropped: int = 0  # rounds past max_length, cut off
    skipped_records: tuple[str, ...] = ()  # bad records ("file#record") passed over to draw this sample

    @property
    def truncated(self) -> bool:
        return self.num_rounds_dropped > 0


class SampleEncoder:
    """Encodes samples for one tokenizer and data config (`DataConfig`)."""

    def __init__(self, tokenizer, max_length: int = 2048, clip_image_size: int = 224, dino_image_size: int = 512,
                 region_box_normalisation: str = "crop", dino_for_all: bool = False,
                 num_image_patches: int = NUM_IMAGE_PATCHES, clip_resize: str = "per_source"):
        self.processor = Processor(tokenizer, clip_image_size, dino_image_size, region_box_normalisation,
                                   num_image_patches, clip_resize)
        self.tokenizer = tokenizer
        self.ids = self.processor.ids
        self.max_length = max_length
        self.dino_for_all = dino_for_all

    @classmethod
    def from_config(cls, tokenizer, data_cfg) -> "SampleEncoder":
        return cls(tokenizer, data_cfg.max_length, data_cfg.clip_image_size, data_cfg.dino_image_size,
                   data_cfg.region_box_normalisation, num_image_patches=data_cfg.num_image_patches,
                   clip_resize=data_cfg.clip_resize)

    def tokenize(self, sample: Sample):
        """Token ids/labels of the (possibly truncated) dialogue and the number of rounds kept."""
        messages = []
        for turn in sample.turns:
            messages += [Message(USER, turn.user), Message(ASSISTANT, turn.assistant)]
        tok = self.processor.dialogue(messages, sample.sample_id)
        n_rounds = len(sample.turns)
        input_ids, labels = tok.input_ids, tok.labels
        if len(input_ids) > self.max_length:
            n_rounds = sum(1 for end in tok.round_ends if end <= self.max_length)
            if n_rounds == 0:
                file, _, record = sample.sample_id.rpartition("#")
                raise DataError(f"the first round alone is {tok.round_ends[0]} tokens, more than max_length="
                                f"{self.max_length}", file, record, "conversation")
            cut = tok.round_ends[n_rounds - 1]
            input_ids, labels = input_ids[:cut], labels[:cut]
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), n_rounds

    def encode(self, sample: Sample) -> EncodedSample:
        sample.check()
        file, _, record = sample.sample_id.rpartition("#")
        input_ids, labels, n_rounds = self.tokenize(sample)
        kept = sample.turns[:n_rounds]
        if sample.task == "grounding" and not any(t.grounding_boxes_xyxy_abs for t in kept):
            raise DataError(f"the [VG] round does not fit in max_length={self.max_length}", file, record,
                            "conversation")

        image = load_image(sample.image_path, sample.sample_id, sample.image_size)
        width, height = image.size
        try:
            clip = self.processor.clip_input(image, sample.clip_resize)
        except ImageShapeError as e:
            raise DataError(str(e), file, record, "image") from None
        image_clip = clip.image_clip
        augment = SquashAugment(*sample.clip_augment) if sample.clip_augment else None
        if augment is not None:
            if clip.geometry.mode != "squash":
                raise ValueError(f"{sample.sample_id}: clip_augment is only defined for squash-resized images")
            image_clip = augment.apply_to_image(image_clip)

        region_rows = [b for t in kept for b in t.region_boxes_xyxy_abs]
        region_boxes = self.processor.region_boxes(region_rows, clip, sample.sample_id)
        if augment is not None:
            region_boxes = augment.apply_to_boxes(region_boxes, self.processor.clip_image_size)
        targets = []
        for t in kept:
            if t.grounding_boxes_xyxy_abs is not None:
                target_xyxy_abs = check_boxes_in_image(t.grounding_boxes_xyxy_abs, width, height, sample.sample_id,
                                                       "grounding boxes")
                targets.append(grounding_targets_for_model(target_xyxy_abs, width, height))

        n_bbox = int((input_ids == self.ids.bbox).sum())
        n_vg = int((input_ids == self.ids.vg).sum())
        if n_bbox != len(region_boxes) or n_vg != len(targets):
            raise DataError(f"after tokenisation: {n_bbox} <bbox> tokens for {len(region_boxes)} boxes, {n_vg} [VG] "
                            f"tokens for {len(targets)} targets (a template or tokenizer splits the special tokens?)",
                            file, record, "conversation")
        image_dino = None
        if targets or self.dino_for_all:
            image_dino = self.processor.dino_input(image)
        return EncodedSample(input_ids, labels, image_clip, image_dino, region_boxes, targets, (height, width),
                             sample.task, sample.sample_id, n_rounds, len(sample.turns) - n_rounds)
