"""Prompt rendering (upstream's vicuna_v1.1 template) and label masking.

A dialogue is a list of `Message`s that alternate user/assistant, starting with the user. Rendering:

    system + " " + Σ_k role_k + ": " + msg_k + (" " after a user turn, "</s>" after an assistant turn)

and a trailing assistant message of ``None`` renders as ``"ASSISTANT:"``: the generation prompt.

Labels follow FastChat's rule as upstream applies it: only assistant replies and their closing "</s>"
are supervised; BOS, the system prompt, user turns and role names are masked with IGNORE_INDEX. We
compute the mask from character spans and the tokenizer's offset mapping rather than upstream's
token-count arithmetic, which depends on how a tokenizer splits a trailing space.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from chatterbox.tokens import NUM_IMAGE_PATCHES, expand_image_placeholder

IGNORE_INDEX = -100
USER = "user"
ASSISTANT = "assistant"


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str
    user_role: str
    assistant_role: str
    sep: str
    sep2: str


VICUNA_V1_1 = ConversationTemplate(
    name="vicuna_v1.1",
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    user_role="USER",
    assistant_role="ASSISTANT",
    sep=" ",
    sep2="</s>",
)


class ConversationError(ValueError):
    """A dialogue that cannot be rendered: wrong turn order, empty turn, misplaced generation prompt."""


@dataclass(frozen=True)
class Message:
    role: str  # USER or ASSISTANT
    text: str | None  # None only for a final assistant message: the generation prompt


@dataclass
class RenderedConversation:
    text: str
    #: [start, end) character spans that are supervised: each assistant reply plus its sep2.
    supervised_spans: list[tuple[int, int]] = field(default_factory=list)
    #: character offset where each round (user message + assistant reply) ends.
    round_ends: list[int] = field(default_factory=list)


def validate_messages(messages: Sequence[Message], where: str = "dialogue") -> None:
    if not messages:
        raise ConversationError(f"{where}: empty dialogue")
    for i, m in enumerate(messages):
        expected = USER if i % 2 == 0 else ASSISTANT
        if m.role != expected:
            raise ConversationError(f"{where}: message {i} has role {m.role!r}, expected {expected!r}")
        if m.text is None:
            if i != len(messages) - 1 or m.role != ASSISTANT:
                raise ConversationError(f"{where}: message {i}: only the last assistant message may be None")
        elif not m.text.strip():
            raise ConversationError(f"{where}: message {i} ({m.role}) is empty")


def render(
    messages: Sequence[Message], template: ConversationTemplate = VICUNA_V1_1, where: str = "dialogue"
) -> RenderedConversation:
    """Render a dialogue. The `<image>` placeholder is left as is (see `expand_image_placeholder`)."""
    validate_messages(messages, where)
    parts = [template.system, template.sep]
    pos = len(template.system) + len(template.sep)
    out = RenderedConversation(text="")
    for i, m in enumerate(messages):
        role = template.user_role if m.role == USER else template.assistant_role
        if m.text is None:
            piece = role + ":"
            parts.append(piece)
            pos += len(piece)
            continue
        head = role + ": "
        tail = template.sep if m.role == USER else template.sep2
        parts.append(head + m.text + tail)
        start = pos + len(head)
        pos += len(head) + len(m.text) + len(tail)
        if m.role == ASSISTANT:
            out.supervised_spans.append((start, pos))
            out.round_ends.append(pos)
    out.text = "".join(parts)
    return out


def generation_prompt(messages: Sequence[Message], template: ConversationTemplate = VICUNA_V1_1) -> str:
    """Render ``messages`` (ending with a user turn) followed by the empty assistant turn."""
    return render(list(messages) + [Message(ASSISTANT, None)], template).text


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    #: token index just past each complete round (for truncation at round boundaries)
    round_ends: list[int]


def tokenize_conversation(
    tokenizer,
    messages: Sequence[Message],
    template: ConversationTemplate = VICUNA_V1_1,
    expand_images: bool = True,
    where: str = "dialogue",
    num_image_patches: int = NUM_IMAGE_PATCHES,
) -> TokenizedConversation:
    """Tokenise a rendered dialogue (BOS first) and build labels supervising only assistant replies.

    ``expand_images`` replaces `<image>` by its image-token positions before tokenising, as upstream
    (``num_image_patches`` + 2: 258 for CLIP ViT-L/14 at 224 px).
    Lengths are not limited here: truncation at round boundaries is the data pipeline's decision.
    """
    rendered = render(messages, template, where)
    text = rendered.text
    spans = rendered.supervised_spans
    round_ends_chars = rendered.round_ends
    if expand_images:
        text, remap = _expand_with_offsets(text, num_image_patches)
        spans = [(remap(s), remap(e)) for s, e in spans]
        round_ends_chars = [remap(e) for e in round_ends_chars]
    # BOS is prepended here rather than by the tokenizer: whether a tokenizer adds it depends on its
    # saved config (add_bos_token), and upstream's sequences always start with it.
    if tokenizer.bos_token_id is None:
        raise ValueError("tokenizer has no BOS token")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = [tokenizer.bos_token_id] + list(enc["input_ids"])
    offsets = [(0, 0)] + [tuple(o) for o in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_i = 0
    for t, (s, e) in enumerate(offsets):
        if e <= s:  # BOS and other zero-width tokens
            continue
        while span_i < len(spans) and spans[span_i][1] <= s:
            span_i += 1
        if span_i < len(spans) and s < spans[span_i][1] and e > spans[span_i][0]:
            labels[t] = input_ids[t]
    round_ends = []
    for end_char in round_ends_chars:
        round_ends.append(sum(1 for s, e in offsets if e > s and s < end_char) + _num_leading_zero_width(offsets))
    return TokenizedConversation(input_ids=input_ids, labels=labels, round_ends=round_ends)


def _num_leading_zero_width(offsets) -> int:
    n = 0
    for s, e in offsets:
        if e > s:
            break
        n += 1
    return n


def _expand_with_offsets(text: str, num_patches: int):
    """Expand `<image>` placeholders and return a function mapping old character offsets to new ones."""
    from chatterbox.tokens import IMAGE_PLACEHOLDER

    expanded = expand_image_placeholder(text, num_patches)
    if expanded == text:
        return text, lambda p: p
    growth = len(expand_image_placeholder(IMAGE_PLACEHOLDER, num_patches)) - len(IMAGE_PLACEHOLDER)
    starts = []
    i = text.find(IMAGE_PLACEHOLDER)
    while i != -1:
        starts.append(i)
        i = text.find(IMAGE_PLACEHOLDER, i + len(IMAGE_PLACEHOLDER))

    def remap(p: int) -> int:
        return p + growth * sum(1 for s in starts if s < p)

    return expanded, remap
