import pytest

from chatterbox.conversation import (
    ASSISTANT, IGNORE_INDEX, USER, VICUNA_V1_1, ConversationError, Message, generation_prompt, render,
    tokenize_conversation,
)
from chatterbox.tokens import special_token_ids

SYSTEM = VICUNA_V1_1.system


def dialogue():
    return [
        Message(USER, "<image>\n What is it <bbox>?"),
        Message(ASSISTANT, "It is a red circle."),
        Message(USER, "Where is the blue square?[VG]"),
        Message(ASSISTANT, "It is on the left."),
        Message(USER, "And what is next to <bbox>?"),
        Message(ASSISTANT, "A green triangle."),
    ]


def test_render_matches_vicuna_v1_1():
    text = render(dialogue()[:2]).text
    assert text == SYSTEM + " USER: <image>\n What is it <bbox>? ASSISTANT: It is a red circle.</s>"


def test_generation_prompt_ends_with_empty_assistant_turn():
    text = generation_prompt([Message(USER, "<image> Where is the dog? [VG]")])
    assert text == SYSTEM + " USER: <image> Where is the dog? [VG] ASSISTANT:"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty dialogue"),
        ([Message(ASSISTANT, "hi")], "expected 'user'"),
        ([Message(USER, "a"), Message(USER, "b")], "expected 'assistant'"),
        ([Message(USER, "   ")], "empty"),
        ([Message(USER, "a"), Message(ASSISTANT, None), Message(USER, "b")], "only the last"),
    ],
)
def test_malformed_dialogues_are_rejected(messages, match):
    with pytest.raises(ConversationError, match=match):
        render(messages, where="sample 7")


def test_only_assistant_replies_and_their_eos_are_supervised(tiny_tokenizer):
    ids = special_token_ids(tiny_tokenizer)
    tc = tokenize_conversation(tiny_tokenizer, dialogue())
    assert len(tc.input_ids) == len(tc.labels)
    assert tc.input_ids[0] == ids.bos and tc.labels[0] == IGNORE_INDEX
    supervised = [t for t, l in zip(tc.input_ids, tc.labels) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(tc.input_ids, tc.labels))
    # Exactly the three replies, each followed by </s>.
    text = tiny_tokenizer.decode(supervised)
    assert text.replace(" ", "") == "Itisaredcircle.</s>Itisontheleft.</s>Agreentriangle.</s>"
    assert supervised.count(ids.eos) == 3
    # No image, region or [VG] token is ever a target.
    for special in (ids.im_patch, ids.im_start, ids.im_end, ids.bbox, ids.vg):
        assert special not in supervised
    assert tc.input_ids.count(ids.im_patch) == 256


def test_round_ends_cut_the_sequence_after_each_eos(tiny_tokenizer):
    ids = special_token_ids(tiny_tokenizer)
    tc = tokenize_conversation(tiny_tokenizer, dialogue())
    assert len(tc.round_ends) == 3 and tc.round_ends[-1] == len(tc.input_ids)
    for end in tc.round_ends:
        assert tc.input_ids[end - 1] == ids.eos
    # Truncating at a round boundary equals tokenising the shorter dialogue.
    short = tokenize_conversation(tiny_tokenizer, dialogue()[:4])
    assert short.input_ids == tc.input_ids[: tc.round_ends[1]]
    assert short.labels == tc.labels[: tc.round_ends[1]]


def test_generation_prompt_has_no_supervised_tokens(tiny_tokenizer):
    msgs = dialogue()[:3] + [Message(ASSISTANT, None)]
    tc = tokenize_conversation(tiny_tokenizer, msgs)
    full = tokenize_conversation(tiny_tokenizer, dialogue()[:2])
    assert sum(l != IGNORE_INDEX for l in tc.labels) == sum(l != IGNORE_INDEX for l in full.labels)
    assert tiny_tokenizer.decode(tc.input_ids).rstrip().endswith("ASSISTANT:")
