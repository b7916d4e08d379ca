"""ChatSession on the tiny model: multi-round dialogue, regions, boxes in pixels, cache == recompute."""
from __future__ import annotations

import pytest
import torch
from chat_support import build_tiny_chat_model, png_header_only, sample_image

from chatterbox.config import ChatConfig
from chatterbox.conversation import ASSISTANT, Message, tokenize_conversation
from chatterbox.data.transforms import ClipGeometry
from chatterbox.serve import session as session_module
from bench.bench_chat import reencoding_session_class
from chatterbox.serve.session import ChatInputError, ChatSession, open_image

MAX_NEW = 12
# (question, region boxes in pixels, max_new_tokens): regions, a [VG] in the question, a round cut by
# the length limit (its last token stays pending), rounds with several <bbox>.
ROUNDS = [
    ("What is <bbox>?", [[10, 20, 100, 120]], MAX_NEW),
    ("Where is the dog? [VG]", None, MAX_NEW),
    ("And <bbox> and <bbox>? [VG]", [[0, 0, 50, 50], [100, 100, 300, 200]], MAX_NEW),
    ("Tell me more.", None, 3),
    ("What about <bbox>?", [[150, 40, 319, 239]], MAX_NEW),
]


@pytest.fixture(scope="module")
def tokenizer(module_tokenizer):
    return module_tokenizer


@pytest.fixture(scope="module")
def model(module_tokenizer):
    return build_tiny_chat_model(module_tokenizer)


def regenerate_from_scratch(model, chat: ChatSession, reply_len: int, max_new_tokens: int):
    """ChatterBox.generate on the whole dialogue before the last reply, without any cache."""
    prompt = chat.dialogue_token_ids[:len(chat.dialogue_token_ids) - reply_len]
    return model.generate(torch.tensor([prompt]), images_clip=chat._images_clip, images_dino=chat._images_dino,
                          image_sizes_hw=torch.tensor([[chat.height, chat.width]]),
                          region_boxes_xyxy_clip_norm=[chat.region_boxes_clip_norm], max_new_tokens=max_new_tokens,
                          use_cache=False)[0]


def test_cached_rounds_equal_recomputing_the_dialogue(model):
    chat = ChatSession(model, sample_image(), max_new_tokens=MAX_NEW)
    generated_vg = ended_by_eos = cut_by_limit = 0
    for index, (question, boxes, max_new) in enumerate(ROUNDS):
        cached_before = len(chat._cached_ids)
        reply = chat.ask(question, boxes, max_new_tokens=max_new)
        ref = regenerate_from_scratch(model, chat, len(reply.token_ids), max_new)
        assert reply.token_ids == ref.token_ids, f"round {index + 1}"
        assert reply.text == ref.text
        # generate() answers every [VG] of the whole prompt; this round's are the last ones.
        n = reply.boxes_xyxy_abs.shape[0]
        assert n == reply.vg_in_question + reply.token_ids.count(model.token_ids.vg)
        assert n == ref.boxes_xyxy_abs.shape[0] - ref.vg_in_prompt + reply.vg_in_question
        if n:
            torch.testing.assert_close(reply.boxes_xyxy_abs, ref.boxes_xyxy_abs[-n:], atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(reply.scores, ref.scores[-n:], atol=1e-4, rtol=1e-4)
        assert reply.vg_in_question == question.count("[VG]")
        # Only the new tokens were encoded: this round's question, plus the "</s>" closing the last reply
        # and the last reply's final token when the length limit stopped it.
        assert reply.stats.prompt_tokens < 40 or index == 0
        assert reply.stats.context_tokens == len(chat.dialogue_token_ids)
        assert cached_before + reply.stats.prompt_tokens + len(reply.token_ids) - len(chat._pending_ids) \
            == len(chat._cached_ids)
        generated_vg += reply.token_ids.count(model.token_ids.vg)
        ended_by_eos += len(reply.token_ids) < max_new
        cut_by_limit += len(reply.token_ids) == max_new
    # The dialogue exercised every path: generated [VG]s, replies ended by </s> and by the limit.
    assert generated_vg and ended_by_eos and cut_by_limit
    assert len(chat.history) == len(ROUNDS)


def test_without_cache_reuse_the_results_are_the_same(model):
    cached = ChatSession(model, sample_image(), max_new_tokens=MAX_NEW)
    fresh = reencoding_session_class()(model, sample_image(), max_new_tokens=MAX_NEW)  # bench_chat's baseline
    for question, boxes, max_new in ROUNDS[:3]:
        a = cached.ask(question, boxes, max_new_tokens=max_new)
        b = fresh.ask(question, boxes, max_new_tokens=max_new)
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.boxes_xyxy_abs, b.boxes_xyxy_abs, atol=1e-3, rtol=1e-4)
    assert b.stats.prompt_tokens == len(fresh.dialogue_token_ids) - len(b.token_ids)  # all of it, again
    assert a.stats.prompt_tokens < b.stats.prompt_tokens / 10


def test_dialogue_tokens_are_the_training_tokenisation(model, tokenizer):
    chat = model.chat_session(sample_image(), max_new_tokens=MAX_NEW)
    for question, boxes, max_new in ROUNDS:
        chat.ask(question, boxes, max_new_tokens=max_new)
    assert sum((t.prompt_token_ids + t.reply.token_ids for t in chat.history), []) == chat.dialogue_token_ids
    # With every reply replaced by the same sentence, the session's prompts and training's tokenisation
    # of the rendered dialogue agree token for token ("</s>" closing each reply included).
    sentence = "It is a dog."
    sentence_ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    session_ids, messages = [], []
    for turn, message in zip(chat.history, chat.messages()[::2]):
        session_ids += turn.prompt_token_ids + sentence_ids
        messages += [message, Message(ASSISTANT, sentence)]
    training = tokenize_conversation(tokenizer, messages).input_ids
    assert training == session_ids + [model.token_ids.eos]
    assert messages[0].text.startswith("<image>\n What is <bbox>?")
    assert all(t.prompt_token_ids[0] == model.token_ids.eos for t in chat.history[1:])


def test_regions_and_boxes_are_in_original_pixels(model):
    image = sample_image(320, 240)
    chat = ChatSession(model, image, max_new_tokens=4)
    region_xyxy_abs = [[40, 30, 200, 150]]
    reply = chat.ask("What is <bbox>?", region_xyxy_abs, ground=True)
    # Regions reach the model mapped through CLIP's resize + centre crop (320x240 -> 298x224, crop x 37).
    geometry = ClipGeometry.build(320, 240, 224, "crop")
    expected = geometry.boxes_to_clip_norm(torch.tensor(region_xyxy_abs, dtype=torch.float64)).float()
    torch.testing.assert_close(chat.region_boxes_clip_norm, expected)
    assert chat.history[0].question == "What is <bbox>? [VG]"
    assert reply.vg_in_question == 1 and reply.boxes_xyxy_abs.shape[0] >= 1
    size = torch.tensor([320.0, 240.0, 320.0, 240.0])
    cx, cy, w, h = (reply.boxes_cxcywh_norm * size).unbind(-1)
    torch.testing.assert_close(reply.boxes_xyxy_abs, torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1),
                               atol=1e-3, rtol=1e-4)
    assert reply.boxes_as_lists()[0] == [round(v, 2) for v in reply.boxes_xyxy_abs[0].tolist()]


def test_a_model_trained_on_squashed_images_is_asked_with_squashed_images(model, monkeypatch):
    """model.clip.resize=squash (the tiny preset): the chat squashes too, unless the options say otherwise."""
    image = sample_image(320, 240)
    monkeypatch.setattr(model.cfg.clip, "resize", "squash")
    chat = ChatSession(model, image, max_new_tokens=2)
    assert chat.clip_geometry.mode == "squash"
    chat.ask("What is <bbox>?", [[40, 30, 200, 150]])
    torch.testing.assert_close(chat.region_boxes_clip_norm, torch.tensor([[40 / 320, 30 / 240, 200 / 320, 150 / 240]]))
    forced = ChatSession(model, image, options=session_module.PromptOptions(clip_resize="crop"))
    assert forced.clip_geometry.mode == "crop"


def test_reset_forgets_history_and_cache(model):
    chat = ChatSession(model, sample_image(), max_new_tokens=MAX_NEW)
    first = chat.ask("What is <bbox>?", [[10, 20, 100, 120]])
    chat.ask("Where is the dog? [VG]")
    chat.reset()
    assert chat.history == [] and chat.dialogue_token_ids == [] and chat.region_boxes_clip_norm.shape == (0, 4)
    again = chat.ask("What is <bbox>?", [[10, 20, 100, 120]])
    assert again.token_ids == first.token_ids and again.stats.prompt_tokens == first.stats.prompt_tokens


def test_bad_input_gives_clear_errors_and_keeps_the_session_usable(model):
    chat = ChatSession(model, sample_image(320, 240), max_new_tokens=MAX_NEW)
    with pytest.raises(ChatInputError, match=r"2 <bbox> token\(s\) but 1 box"):
        chat.ask("Compare <bbox> and <bbox>.", [[0, 0, 10, 10]])
    with pytest.raises(ChatInputError, match=r"0 <bbox> token\(s\) but 1 box"):
        chat.ask("What is this?", [[0, 0, 10, 10]])
    with pytest.raises(ChatInputError, match=r"outside the 320x240 image"):
        chat.ask("What is <bbox>?", [[10, 10, 400, 100]])
    with pytest.raises(ChatInputError, match=r"zero or negative size"):
        chat.ask("What is <bbox>?", [[50, 10, 20, 100]])
    with pytest.raises(ChatInputError, match=r"x1, y1, x2, y2"):
        chat.ask("What is <bbox>?", [[1, 2, 3]])
    with pytest.raises(ChatInputError, match=r"question contains '<image>'"):
        chat.ask("<image> What is this?")
    with pytest.raises(ChatInputError, match=r"question is empty"):
        chat.ask("   ")
    assert chat.history == []
    reply = chat.ask("What is <bbox>?", [[10, 20, 100, 120]])
    reference = ChatSession(model, sample_image(320, 240), max_new_tokens=MAX_NEW).ask("What is <bbox>?",
                                                                                       [[10, 20, 100, 120]])
    assert reply.token_ids == reference.token_ids


def test_context_limit_is_reported(model):
    chat = ChatSession(model, sample_image(), max_new_tokens=MAX_NEW)
    chat.max_context = 310
    chat.ask("What is <bbox>?", [[10, 20, 100, 120]])
    with pytest.raises(ChatInputError, match=r"more than the model's context of 310.*reset\(\)"):
        chat.ask("Please give a brief answer in one sentence less than 10 words.")


def test_images_are_checked_before_decoding(tmp_path):
    with pytest.raises(ChatInputError, match="not an image"):
        open_image(b"%PDF-1.4 definitely not a picture", what="upload")
    with pytest.raises(ChatInputError, match="file not found"):
        open_image(tmp_path / "missing.png")
    # Refused from the header, before any pixel is decoded (the data of these files is truncated).
    with pytest.raises(ChatInputError, match=r"10000x10000 = 100,000,000 pixels, more than the limit of 40,000,000"):
        open_image(png_header_only(10000, 10000), max_image_pixels=40_000_000)
    with pytest.raises(ChatInputError, match=r"too large to decode safely"):  # beyond PIL's own bomb guard
        open_image(png_header_only(30000, 30000), max_image_pixels=None)
    with pytest.raises(ChatInputError, match=r"could not be decoded"):  # within limits, but truncated
        open_image(png_header_only(64, 64))
    rgba = sample_image(64, 48).convert("RGBA")
    path = tmp_path / "rgba.png"
    rgba.save(path)
    loaded = open_image(path)
    assert loaded.mode == "RGB" and loaded.size == (64, 48)


def test_defaults_follow_the_chat_config():
    assert session_module.DEFAULT_MAX_IMAGE_PIXELS == ChatConfig().max_image_pixels
    assert session_module.DEFAULT_MAX_NEW_TOKENS == ChatConfig().max_new_tokens
