"""Stack encoded samples into the batch the model consumes (the batch contract, see docs/data.md).

One dialogue per image, so ``offset`` is ``[0, 1, ..., B]`` (upstream's layout). Sequences are padded
on the right with the tokenizer's pad id; labels with IGNORE_INDEX.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from chatterbox.conversation import IGNORE_INDEX
from chatterbox.data.pipeline import EncodedSample


def collate_samples(samples: Sequence[EncodedSample], pad_token_id: int) -> dict:
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch_size = len(samples)
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[b, :n] = s.input_ids
        labels[b, :n] = s.labels
        attention_mask[b, :n] = 1
    has_grounding = any(s.grounding_targets_cxcywh_norm for s in samples)
    images_dino = None
    if has_grounding:
        missing = [s.sample_id for s in samples if s.image_dino is None]
        if missing:
            raise ValueError(f"batch mixes grounding samples with samples lacking a DINO image: {missing}")
        images_dino = torch.stack([s.image_dino for s in samples])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "images_clip": torch.stack([s.image_clip for s in samples]),
        "images_dino": images_dino,
        "offset": torch.arange(batch_size + 1, dtype=torch.long),
        "image_sizes_hw": torch.tensor([s.image_size_hw for s in samples], dtype=torch.long),
        "region_boxes_xyxy_clip_norm": [s.region_boxes_xyxy_clip_norm for s in samples],
        "grounding_targets_cxcywh_norm": [list(s.grounding_targets_cxcywh_norm) for s in samples],
        "task": [s.task for s in samples],
        "sample_ids": [s.sample_id for s in samples],
    }


def collate_with_report(samples: Sequence[EncodedSample], pad_token_id: int) -> tuple[dict, dict]:
    """`collate_samples`, and what the data pipeline gave up to make these samples: the bad records it
    passed over (``skipped_records``, "file#record") and the dialogue rounds cut at max_length."""
    report = {"skipped_records": [r for s in samples for r in s.skipped_records],
              "truncated_samples": sum(s.truncated for s in samples),
              "rounds_dropped": sum(s.num_rounds_dropped for s in samples)}
    return collate_samples(samples, pad_token_id), report


def make_collate_fn(tokenizer):
    """A picklable collate function for DataLoader workers: (batch, report), see `collate_with_report`."""
    return partial(collate_with_report, pad_token_id=tokenizer.pad_token_id)
