"""The records that flow through the data pipeline.

Two layers:

* **Source records** (`DialogueRecord`, `RegionRecord`, `JsonlDialogueRecord`): what a reader parses out
  of one entry of a file, validated but not yet turned into a prompt. Boxes are xyxy in pixels of the original
  image (`*_xyxy_abs`), whatever layout the file used.
* **`Sample`**: one concrete training dialogue built from a source record (dialogues.py), with every
  `<bbox>` in a user turn backed by one region box and every `[VG]` backed by its target boxes. This is
  what the encoder (pipeline.py) tokenises and turns into tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatterbox.data.errors import DataError
from chatterbox.tokens import BBOX_TOKEN, IMAGE_PLACEHOLDER, VG_TOKEN

TaskKind = Literal["grounding", "referring", "vqa"]
TASKS = ("grounding", "referring", "vqa")
#: How the CLIP image is made: HF CLIP "crop" (shortest side -> 224, centre crop) or mmdet-style
#: "squash" (resize to 224x224 ignoring aspect), per upstream source (spec §3.1).
ClipResize = Literal["crop", "squash"]


@dataclass(frozen=True)
class NamedBox:
    name: str
    box_xyxy_abs: tuple[float, float, float, float]


@dataclass
class DialogueTurn:
    """One human/gpt pair of a conversation-style record, with its box groups parsed out of the text."""

    question: str
    answer: str
    question_boxes: list[NamedBox] = field(default_factory=list)
    answer_boxes: list[NamedBox] = field(default_factory=list)
    #: the text carried a box group that upstream deliberately treats as "no box" (e.g. "[0,0,0,0]")
    question_group_unusable: bool = False
    answer_group_unusable: bool = False


@dataclass
class DialogueRecord:
    """A conversation record (CB-300K, CB-materials, LLaVA)."""

    file: str
    index: int
    image_path: str
    turns: list[DialogueTurn]
    image_size: tuple[int, int] | None = None  # (width, height) when the file states it
    category_id: int | None = None


@dataclass(frozen=True)
class Region:
    """One annotated box of an image with its text (category name, caption or phrase)."""

    box_xyxy_abs: tuple[float, float, float, float]
    text: str
    ann_id: int | str | None = None


@dataclass
class RegionRecord:
    """An image with annotated regions (COCO instances, MDETR RefCOCO/VG/Flickr json, refer refs)."""

    file: str
    index: int
    image_path: str
    regions: list[Region]
    image_size: tuple[int, int] | None = None  # (width, height)
    caption: str | None = None
    #: extra per-record data a builder needs (e.g. Flickr phrases, refer sentences)
    extra: dict = field(default_factory=dict)


@dataclass
class Turn:
    """One round of a built dialogue: a user message and the assistant's reply."""

    user: str
    assistant: str
    #: one box per `<bbox>` in ``user``, in order of appearance (xyxy, original pixels)
    region_boxes_xyxy_abs: list[tuple[float, float, float, float]] = field(default_factory=list)
    #: target boxes of the `[VG]` in ``user`` (k >= 1), or None when the turn has no `[VG]`
    grounding_boxes_xyxy_abs: list[tuple[float, float, float, float]] | None = None


@dataclass
class JsonlDialogueRecord:
    """A dialogue of ChatterBox's own JSONL format (readers/jsonl.py): written as the model's turns already,
    `<bbox>` and `[VG]` in the questions with their boxes; ``index`` is its line number in the file."""

    file: str
    index: int
    image_path: str
    turns: list[Turn]  # the first question without `<image>`: a builder puts the image in front
    image_size: tuple[int, int] | None = None  # (width, height) when the file states it


@dataclass
class Sample:
    """A dialogue about one image, ready to be encoded. ``turns[0].user`` starts with `<image>`."""

    sample_id: str  # "<source file>#<record index>"
    image_path: str
    task: TaskKind
    turns: list[Turn]
    clip_resize: ClipResize = "crop"
    image_size: tuple[int, int] | None = None  # (width, height) if known before loading
    #: mmdet-style shift/flip of the squashed CLIP image (COCO detection), as (dx, dy, flip) in CLIP pixels
    clip_augment: tuple[int, int, bool] | None = None

    def check(self) -> None:
        """Raise DataError unless every `<bbox>` / `[VG]` has its boxes and the dialogue is non-empty."""
        file, _, record = self.sample_id.rpartition("#")
        if self.task not in TASKS:
            raise DataError(f"unknown task {self.task!r}", file, record, "task")
        if not self.turns:
            raise DataError("empty dialogue", file, record, "conversation")
        n_images = sum(t.user.count(IMAGE_PLACEHOLDER) + t.assistant.count(IMAGE_PLACEHOLDER) for t in self.turns)
        if n_images != 1 or IMAGE_PLACEHOLDER not in self.turns[0].user:
            raise DataError(f"expected exactly one {IMAGE_PLACEHOLDER}, in the first user message (found {n_images})",
                            file, record, "conversation")
        for i, turn in enumerate(self.turns):
            if not turn.user.strip() or not turn.assistant.strip():
                raise DataError(f"turn {i} has an empty user or assistant message", file, record, "conversation")
            for text, role in ((turn.assistant, "assistant"),):
                if BBOX_TOKEN in text or VG_TOKEN in text:
                    raise DataError(f"turn {i}: {role} text contains {BBOX_TOKEN} or {VG_TOKEN}", file, record,
                                    "conversation")
            n_bbox = turn.user.count(BBOX_TOKEN)
            if n_bbox != len(turn.region_boxes_xyxy_abs):
                raise DataError(
                    f"turn {i}: {n_bbox} {BBOX_TOKEN} token(s) but {len(turn.region_boxes_xyxy_abs)} region box(es)",
                    file, record, "conversation")
            n_vg = turn.user.count(VG_TOKEN)
            if n_vg > 1:
                raise DataError(f"turn {i}: more than one {VG_TOKEN} in one message", file, record, "conversation")
            has_targets = turn.grounding_boxes_xyxy_abs is not None
            if n_vg != int(has_targets) or (has_targets and not turn.grounding_boxes_xyxy_abs):
                raise DataError(f"turn {i}: {n_vg} {VG_TOKEN} token(s) but targets={turn.grounding_boxes_xyxy_abs}",
                                file, record, "conversation")

    @property
    def num_grounding_targets(self) -> int:
        return sum(t.grounding_boxes_xyxy_abs is not None for t in self.turns)
