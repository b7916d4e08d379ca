"""A multi-round chat about one image, with a KV cache kept across rounds.

    chat = model.chat_session("photo.jpg")            # or ChatSession(model, image)
    reply = chat.ask("What is <bbox> holding?", boxes=[[x1, y1, x2, y2]])   # boxes in original pixels
    reply = chat.ask("Where is the cup? [VG]")        # reply.boxes_xyxy_abs: one box per [VG], in pixels
    chat.reset()

The dialogue is the token sequence training uses (vicuna_v1.1, chatterbox.conversation):
``BOS system USER: <image>\\n q1 ASSISTANT: r1</s>USER: q2 ASSISTANT: r2</s>...``. The reply ``r_k`` is
kept as the token ids the model generated (not re-tokenised text), so the cache always holds exactly
the dialogue the model saw. A new round feeds only what is not cached yet: the last generated token
(if generation stopped on the length limit), the ``</s>`` that closes the previous reply and the new
``USER: ... ASSISTANT:`` text, with the `<bbox>` regions of the new question injected. The CLIP image
is encoded in the first round (and again only when a later question has regions); the vision-branch
backbone runs once per session.

Decoding goes through chatterbox.model.decoding, the same code as ``ChatterBox.generate``: a static KV
cache sized to the model's context, whose decode steps run as ``model.decode_options`` say; by default
the fused one-token step, captured as CUDA graphs (one per attention-length bucket) when the session is
created on a CUDA device.

Semantics equal ``ChatterBox.generate`` on the whole dialogue: the query of a `[VG]` is the final
hidden state of the token before it (prompt `[VG]`s from the prefill, generated ones from the step
that produced them), and greedy decoding gives the same tokens and boxes as re-running the dialogue
from scratch (tests/test_chat_session.py checks this).
"""
from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from chatterbox.boxes import BoxError, as_box_tensor, validate_xyxy
from chatterbox.conversation import ASSISTANT, USER, ConversationError, Message
from chatterbox.data.processor import Processor
from chatterbox.data.transforms import ImageShapeError, region_boxes_for_model, to_rgb
from chatterbox.model.decoding import decode
from chatterbox.model.query_head import positions_before_token
from chatterbox.tokens import (BBOX_TOKEN, IMAGE_END_TOKEN, IMAGE_PATCH_TOKEN, IMAGE_PLACEHOLDER, IMAGE_START_TOKEN,
                               VG_TOKEN)

#: Defaults of chatterbox.config.ChatConfig (kept in step by tests/test_chat_session.py).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_NEW_TOKENS = 512


class ChatInputError(ValueError):
    """Input a user can fix (question, boxes, image): the message says what is wrong and where."""


# ---------------------------------------------------------------------------------------------------
# images
def open_image(source, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, what: str = "image") -> Image.Image:
    """A path, bytes or PIL image -> 8-bit RGB with its EXIF orientation applied.

    The pixel count is checked from the header *before* decoding, so a decompression bomb is refused
    without being expanded in memory. Unreadable or non-image input raises ChatInputError.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_image_pixels, what)
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ChatInputError(f"{what}: the upload is empty")
        opener, label = (lambda: io.BytesIO(bytes(source))), what
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ChatInputError(f"{what}: file not found: {path}")
        opener, label = (lambda: open(path, "rb")), f"{what} {path}"
    else:
        raise ChatInputError(f"{what}: expected a file path, bytes or a PIL image, got {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own limit is checked below; PIL's softer warning threshold would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with opener() as stream, Image.open(stream) as img:
                _check_pixels(img.width, img.height, max_image_pixels, label)
                return to_rgb(ImageOps.exif_transpose(img))
    except ChatInputError:
        raise
    except Image.DecompressionBombError as e:
        raise ChatInputError(f"{label} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ChatInputError(f"{label} is not an image that can be read (PNG, JPEG, WebP, ...): {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ChatInputError(f"{label} could not be decoded (truncated or corrupt file?): {e}") from e


def _check_pixels(width: int, height: int, limit: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ChatInputError(f"{what} has no pixels ({width}x{height})")
    if limit is not None and width * height > limit:
        raise ChatInputError(f"{what} is {width}x{height} = {width * height:,} pixels, more than the limit of "
                             f"{limit:,} pixels; downscale it first")


# ---------------------------------------------------------------------------------------------------
# results
@dataclass
class RoundStats:
    """Where the time of one round went (seconds; on a GPU, between CUDA events recorded at each boundary,
    read when the round's tokens have reached the host: timing makes no extra synchronisation)."""

    round_index: int
    prompt_tokens: int          # tokens encoded in this round's prefill (only the new ones with the cache)
    context_tokens: int         # dialogue length after the round
    generated_tokens: int
    prefill_s: float            # embeddings + LLM prefill
    first_token_s: float        # from the call to the first generated token
    decode_s: float             # after the first token until the last
    boxes_s: float              # query head + vision branch (backbone included in the first grounding round)
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


@dataclass
class ChatReply:
    """One answer. ``boxes_*`` have one row per `[VG]` of the round: the question's first, then the reply's."""

    text: str
    token_ids: list[int]
    boxes_xyxy_abs: torch.Tensor      # [n,4] original-image pixels
    boxes_cxcywh_norm: torch.Tensor   # [n,4] fractions of the original image
    scores: torch.Tensor              # [n] best sigmoid score (0 where no box passed the threshold)
    vg_in_question: int               # how many of the boxes answer a [VG] typed in the question
    #: [n] False where no box passed the threshold and upstream's fallback box [0, 0, 1, 1] was returned
    found: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    stats: RoundStats | None = None

    def boxes_as_lists(self) -> list[list[float]]:
        return [[round(float(v), 2) for v in box] for box in self.boxes_xyxy_abs.tolist()]


@dataclass
class ChatTurn:
    question: str                     # as given to the model (image prefix excluded, [VG] included)
    region_boxes_xyxy_abs: torch.Tensor
    prompt_token_ids: list[int]       # "</s>USER: ... ASSISTANT:" (round 1: BOS, system, image, question)
    reply: ChatReply


@dataclass(frozen=True)
class PromptOptions:
    """How questions and images become model inputs; the defaults equal chatterbox.data.DataConfig's."""

    image_prefix: str = "<image>\n "      # opens the first user message (spec §3.2)
    vg_separator: str = " "               # question + separator + "[VG]" when ``ground=True``
    # CLIP preprocessing: "crop" (HF CLIPImageProcessor) or "squash"; None: the model's (model.clip.resize)
    clip_resize: str | None = None
    region_box_normalisation: str = "crop"

    @classmethod
    def from_data_config(cls, data_cfg) -> "PromptOptions":
        return cls(image_prefix=data_cfg.image_prompt_prefix, vg_separator=data_cfg.vg_separator,
                   region_box_normalisation=data_cfg.region_box_normalisation)


_FORBIDDEN_IN_QUESTIONS = (IMAGE_PLACEHOLDER, IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_PATCH_TOKEN)


class _RoundClock:
    """Named moments of a round, without making the host wait for the device: CUDA events on a GPU (read
    after the round's results were copied to the host, so they are complete), the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict = {}
        self.mark("start")

    def mark(self, name: str) -> None:
        if self.cuda:
            self.marks[name] = torch.cuda.Event(enable_timing=True)
            self.marks[name].record()
        else:
            self.marks[name] = time.perf_counter()

    def seconds(self, since: str, until: str) -> float:
        if self.cuda:
            self.marks[until].synchronize()
            return self.marks[since].elapsed_time(self.marks[until]) / 1000
        return self.marks[until] - self.marks[since]


# ---------------------------------------------------------------------------------------------------
class ChatSession:
    """A dialogue about one image. Not thread-safe: one ``ask`` at a time per session."""

    def __init__(self, model, image, *, options: PromptOptions | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, box_threshold: float | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.model = model.eval()
        self.options = options or PromptOptions()
        self.max_new_tokens = max_new_tokens
        self.box_threshold = box_threshold
        self._decoder = None
        self.tokenizer = model.tokenizer
        self.token_ids = model.token_ids
        self.image = open_image(image, max_image_pixels)
        self.width, self.height = self.image.size
        cfg = model.cfg
        self.device = next(model.parameters()).device
        # The model's own sizes; images in the model's CLIP mode unless the options name one.
        self.processor = Processor(model.tokenizer, cfg.clip.image_size, cfg.vision.image_size,
                                   self.options.region_box_normalisation, model.clip_tower.num_patches,
                                   clip_resize="per_source" if self.options.clip_resize else cfg.clip.resize)
        try:
            clip = self.processor.clip_input(self.image, self.options.clip_resize or "crop")
        except ImageShapeError as e:
            raise ChatInputError(str(e)) from None
        self.clip_geometry = clip.geometry
        self._images_clip = clip.image_clip[None].to(self.device)
        self._images_dino = self.processor.dino_input(self.image)[None]
        self._vision_features = None  # backbone features of the image, computed on the first [VG]
        lm_config = model.causal_lm.config
        self.max_context = min(lm_config.max_position_embeddings, cfg.language.model_max_length)
        self.reset()
        if self.device.type == "cuda":
            # Capture the decode steps now (where the options ask for graphs), so that no round pays for it.
            self._decoder_for(self.max_context).capture()

    # ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the dialogue (history and KV cache); the image and its vision features are kept."""
        self.history: list[ChatTurn] = []
        if self._decoder is not None:
            self._decoder.reset()  # buffers (and the captured graph) are kept for the next dialogue
        self._cached_ids: list[int] = []    # tokens whose keys/values are in the cache
        self._pending_ids: list[int] = []   # generated but not fed yet (generation stopped at the limit)
        self._regions_per_round: list[torch.Tensor] = []  # CLIP-normalised xyxy, one tensor per round

    @property
    def dialogue_token_ids(self) -> list[int]:
        """Every token of the dialogue so far (BOS first), as the model saw or produced them."""
        return self._cached_ids + self._pending_ids

    @property
    def region_boxes_clip_norm(self) -> torch.Tensor:
        """All `<bbox>` regions of the dialogue in order, xyxy normalised to the CLIP input."""
        if not self._regions_per_round:
            return torch.zeros(0, 4)
        return torch.cat(self._regions_per_round)

    def messages(self) -> list[Message]:
        """The dialogue as conversation messages (replies as decoded text)."""
        out = []
        for i, turn in enumerate(self.history):
            out.append(Message(USER, (self.options.image_prefix if i == 0 else "") + turn.question))
            out.append(Message(ASSISTANT, turn.reply.text))
        return out

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ask(self, question: str, boxes: Sequence[Sequence[float]] | torch.Tensor | None = None, *,
            ground: bool = False, max_new_tokens: int | None = None, min_new_tokens: int = 0,
            do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
            generator: torch.Generator | None = None) -> ChatReply:
        """One round: ``question`` may contain `<bbox>` (one box of ``boxes`` each, original-image pixels
        xyxy) and `[VG]` (a box is predicted for it); ``ground=True`` appends `[VG]` when absent.
        ``min_new_tokens`` suppresses end-of-sequence before that many tokens (benchmarks)."""
        clock = _RoundClock(self.device)
        question = self._check_question(question, ground)
        region_boxes_xyxy_abs, region_clip_norm = self._check_regions(question, boxes)
        first_round = not self.history
        segment = self._segment_ids(question, first_round)
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise ChatInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")

        context_before = len(self._cached_ids) + len(self._pending_ids)
        room = self.max_context - context_before - len(segment)
        if room < 1:
            raise ChatInputError(f"the dialogue would be {context_before + len(segment)} tokens, more than the "
                                 f"model's context of {self.max_context}; start over with reset()")
        max_new_tokens = min(max_new_tokens, room)
        # Columns the decoder may hold by the end of the round (the last picked token is never fed).
        decoder = self._decoder_for(context_before + len(segment) + max_new_tokens - 1)
        reuse = decoder.length == len(self._cached_ids)
        if reuse:
            chunk = self._pending_ids + segment
            regions = region_clip_norm
        else:  # everything again, from an empty cache
            decoder.reset()
            chunk = self._cached_ids + self._pending_ids + segment
            regions = torch.cat([self.region_boxes_clip_norm, region_clip_norm])
        # Where this round's question starts inside ``chunk`` ([VG]s before it were answered already).
        segment_start = len(chunk) - len(segment)

        try:
            reply = self._run_round(decoder, chunk, regions, segment_start, max_new_tokens, min_new_tokens,
                                    do_sample, temperature, top_p, generator, clock)
        except BaseException:
            # Keep the cache in step with the dialogue (a failed first encode leaves it empty).
            decoder.truncate(min(decoder.length, len(self._cached_ids)) if reuse else 0)
            raise
        self._regions_per_round.append(region_clip_norm)
        self.history.append(ChatTurn(question, region_boxes_xyxy_abs, segment, reply))
        return reply

    # ------------------------------------------------------------------------------------------------
    def _check_question(self, question: str, ground: bool) -> str:
        if not isinstance(question, str):
            raise ChatInputError(f"question must be text, got {type(question).__name__}")
        question = question.strip()
        if not question:
            raise ChatInputError("question is empty")
        for token in _FORBIDDEN_IN_QUESTIONS:
            if token in question:
                raise ChatInputError(f"question contains {token!r}: the image is attached by the session, "
                                     "questions may only use <bbox> and [VG]")
        if ground and VG_TOKEN not in question:
            question = question + self.options.vg_separator + VG_TOKEN
        return question

    def _check_regions(self, question: str, boxes) -> tuple[torch.Tensor, torch.Tensor]:
        expected = question.count(BBOX_TOKEN)
        try:
            empty = boxes is None or len(boxes) == 0
            boxes_xyxy_abs = torch.zeros(0, 4) if empty else as_box_tensor(boxes).reshape(-1, 4)
        except (BoxError, ValueError, TypeError, RuntimeError) as e:
            raise ChatInputError(f"boxes must be a list of [x1, y1, x2, y2] pixel boxes: {e}") from e
        if boxes_xyxy_abs.shape[0] != expected:
            raise ChatInputError(f"the question has {expected} {BBOX_TOKEN} token(s) but {boxes_xyxy_abs.shape[0]} "
                                 f"box(es) were given; give one [x1, y1, x2, y2] box per {BBOX_TOKEN}")
        try:
            boxes_xyxy_abs = validate_xyxy(boxes_xyxy_abs, self.width, self.height, where="boxes")
        except BoxError as e:
            raise ChatInputError(f"{e} (boxes are x1, y1, x2, y2 in pixels of the {self.width}x{self.height} "
                                 "image)") from e
        # validate_xyxy allows a pixel of rounding slack outside the image; the model sees the clamped box.
        limit = torch.tensor([self.width, self.height, self.width, self.height], dtype=boxes_xyxy_abs.dtype)
        boxes_xyxy_abs = torch.minimum(boxes_xyxy_abs.clamp(min=0), limit)
        region_clip_norm = region_boxes_for_model(boxes_xyxy_abs, self.clip_geometry,
                                                  self.processor.region_box_normalisation)
        return boxes_xyxy_abs.float(), region_clip_norm

    def _segment_ids(self, question: str, first_round: bool) -> list[int]:
        """Token ids of the new round up to "ASSISTANT:" (BOS + system + image in the first round)."""
        try:
            if first_round:
                return self.processor.prompt_ids([Message(USER, self.options.image_prefix + question)])
            return self.processor.next_round_ids(question)
        except ConversationError as e:
            raise ChatInputError(str(e)) from e

    # ------------------------------------------------------------------------------------------------
    def _decoder_for(self, columns: int):
        """The session's KV decoder, (re)built when it cannot hold ``columns`` (``max_context`` raised)."""
        if self._decoder is None or self._decoder.capacity < columns:
            self._decoder = self.model.make_decoder(1, max(self.max_context, columns))
        return self._decoder

    def _run_round(self, decoder, chunk, regions, segment_start, max_new_tokens, min_new_tokens,
                   do_sample, temperature, top_p, generator, clock: "_RoundClock") -> ChatReply:
        model, ids = self.model, self.token_ids
        cached_before = decoder.length
        chunk_ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        embeds = model.build_inputs_embeds(chunk_ids, self._images_clip, None, [regions.to(self.device)],
                                           sample_ids=[f"chat round {len(self.history) + 1}"])
        hidden = decoder.prefill(embeds)
        clock.mark("prefilled")

        # Queries of this question's [VG]s: the hidden state of the token before each.
        _, vg_cols = positions_before_token(chunk_ids, ids.vg)
        query_hidden = [hidden[0, c] for c in vg_cols.tolist() if c + 1 >= segment_start]
        vg_in_question = len(query_hidden)

        decoded = decode(model, decoder, hidden[:, -1], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator,
                         on_first_token=lambda: clock.mark("first_token"))
        generated = decoded.token_ids[0]
        query_hidden.extend(decoded.vg_hidden[0])
        # Drop what the device ran past the end (it stops only at its periodic end-of-sequence checks).
        fed = chunk + generated[:decoded.fed_tokens(0)]
        decoder.truncate(cached_before + len(fed))
        clock.mark("decoded")
        boxes_xyxy_abs, boxes_cxcywh_norm, scores, found = self._boxes(query_hidden)
        clock.mark("end")

        self._cached_ids = (self._cached_ids + fed) if cached_before else fed
        self._pending_ids = generated[decoded.fed_tokens(0):]
        stats = RoundStats(round_index=len(self.history) + 1, prompt_tokens=len(chunk),
                           context_tokens=len(self.dialogue_token_ids), generated_tokens=len(generated),
                           prefill_s=clock.seconds("start", "prefilled"),
                           first_token_s=clock.seconds("start", "first_token"),
                           decode_s=clock.seconds("first_token", "decoded"), boxes_s=clock.seconds("decoded", "end"),
                           total_s=clock.seconds("start", "end"))
        return ChatReply(text=self.tokenizer.decode(generated), token_ids=generated, boxes_xyxy_abs=boxes_xyxy_abs,
                         boxes_cxcywh_norm=boxes_cxcywh_norm, scores=scores, vg_in_question=vg_in_question,
                         found=found, stats=stats)

    def _boxes(self, query_hidden: list[torch.Tensor]):
        if not query_hidden:
            return torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        if self._vision_features is None:  # one image: its backbone features serve every round
            self._vision_features = self.model.image_features(self._images_dino.to(self.device))
        image_index = torch.zeros(len(query_hidden), dtype=torch.long)
        sizes_wh = torch.tensor([[self.width, self.height]] * len(query_hidden))
        best = self.model.boxes_for_queries(torch.stack(query_hidden), self._vision_features, image_index, sizes_wh,
                                            self.box_threshold)
        return (best.boxes_xyxy_abs.float().cpu(), best.boxes_cxcywh_norm.float().cpu(), best.scores.float().cpu(),
                best.found.cpu())

