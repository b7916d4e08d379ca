import pytest

from chatterbox.tiny_tokenizer import build_tiny_tokenizer
from chatterbox.tokens import (
    BBOX_TOKEN, IMAGE_END_TOKEN, IMAGE_PATCH_TOKEN, IMAGE_PLACEHOLDER, IMAGE_START_TOKEN, IMAGE_TOKEN_SPAN,
    VG_TOKEN, TokenizerError, add_chatterbox_tokens, expand_image_placeholder, special_token_ids,
)


def test_tokens_added_in_upstream_order_after_base_vocab(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    base = len(tok)
    ids = add_chatterbox_tokens(tok)
    assert (ids.vg, ids.im_patch, ids.im_start, ids.im_end, ids.bbox) == tuple(range(base, base + 5))
    assert len(tok) == base + 5
    # [VG] is an ordinary added token, the other four are special (upstream's split).
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert VG_TOKEN not in special
    assert {IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, BBOX_TOKEN} <= special
    assert ids.pad == tok.unk_token_id and tok.padding_side == "right"


def test_adding_twice_is_idempotent(tiny_tokenizer):
    before = special_token_ids(tiny_tokenizer)
    n = len(tiny_tokenizer)
    assert add_chatterbox_tokens(tiny_tokenizer) == before
    assert len(tiny_tokenizer) == n


def test_each_added_token_is_a_single_id_inside_text(tiny_tokenizer):
    ids = special_token_ids(tiny_tokenizer)
    enc = tiny_tokenizer("Where is the dog?[VG] What is it <bbox>?", add_special_tokens=False)["input_ids"]
    assert enc.count(ids.vg) == 1 and enc.count(ids.bbox) == 1


def test_ids_survive_save_and_reload(tiny_tokenizer, tmp_path):
    from chatterbox.tokens import load_tokenizer

    ids = special_token_ids(tiny_tokenizer)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert special_token_ids(load_tokenizer(str(tmp_path))) == ids


def test_lookup_without_added_tokens_fails_clearly(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    with pytest.raises(TokenizerError, match=r"\[VG\]"):
        special_token_ids(tok)


def test_image_placeholder_expands_to_258_positions(tiny_tokenizer):
    ids = special_token_ids(tiny_tokenizer)
    text = expand_image_placeholder(IMAGE_PLACEHOLDER + "\n Where is it?")
    enc = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    start = enc.index(ids.im_start)
    assert enc[start + IMAGE_TOKEN_SPAN - 1] == ids.im_end
    assert enc[start + 1 : start + IMAGE_TOKEN_SPAN - 1] == [ids.im_patch] * 256
    assert IMAGE_TOKEN_SPAN == 258


def test_tiny_tokenizer_is_reused(tmp_path):
    first = build_tiny_tokenizer(tmp_path)
    mtime = (first / "tokenizer_config.json").stat().st_mtime_ns
    assert build_tiny_tokenizer(tmp_path) == first
    assert (first / "tokenizer_config.json").stat().st_mtime_ns == mtime
