"""ChatterBox's added tokens and the `<image>` placeholder.

Upstream adds, in this order: ``[VG]`` as an ordinary token (its hidden-state predecessor drives the
grounding query), then ``<im_patch>``, ``<im_start>``, ``<im_end>``, ``<bbox>`` as special tokens. On the
LLaMA-2 vocabulary (32000) that gives ids 32000..32004, but ids are always looked up, never assumed.
"""
from __future__ import annotations

from dataclasses import dataclass

VG_TOKEN = "[VG]"
IMAGE_PATCH_TOKEN = "<im_patch>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
BBOX_TOKEN = "<bbox>"
IMAGE_PLACEHOLDER = "<image>"

#: CLIP ViT-L/14 at 224 px: 16 x 16 patches.
NUM_IMAGE_PATCHES = 256
#: Sequence positions one image takes after expansion: <im_start> + 256 patches + <im_end>.
IMAGE_TOKEN_SPAN = NUM_IMAGE_PATCHES + 2

# Upstream's order matters: it fixes the ids of the rows appended to embed_tokens / lm_head.
ORDINARY_ADDED_TOKENS = (VG_TOKEN,)
SPECIAL_ADDED_TOKENS = (IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, BBOX_TOKEN)


class TokenizerError(ValueError):
    """The tokenizer lacks a token ChatterBox needs, or splits it into several pieces."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens ChatterBox's model and data code look for."""

    vg: int
    im_patch: int
    im_start: int
    im_end: int
    bbox: int
    bos: int
    eos: int
    pad: int


def add_chatterbox_tokens(tokenizer) -> SpecialTokenIds:
    """Add the five ChatterBox tokens (idempotent) and set upstream's padding; return their ids.

    The caller resizes the LLM's embeddings to ``len(tokenizer)`` afterwards.
    """
    vocab = tokenizer.get_vocab()
    missing_ordinary = [t for t in ORDINARY_ADDED_TOKENS if t not in vocab]
    if missing_ordinary:
        tokenizer.add_tokens(missing_ordinary, special_tokens=False)
    missing_special = [t for t in SPECIAL_ADDED_TOKENS if t not in vocab]
    if missing_special:
        tokenizer.add_tokens(missing_special, special_tokens=True)
    configure_padding(tokenizer)
    return special_token_ids(tokenizer)


def configure_padding(tokenizer) -> None:
    """Upstream pads on the right with the unknown token (LLaMA has no pad token)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is None:
            raise TokenizerError("tokenizer has neither a pad nor an unk token to pad with")
        tokenizer.pad_token = tokenizer.unk_token


def _single_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise TokenizerError(
            f"tokenizer has no token {token!r}; call chatterbox.tokens.add_chatterbox_tokens(tokenizer) first"
        )
    encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
    if encoded != [ids[0]]:
        raise TokenizerError(f"tokenizer splits {token!r} into {encoded}; it must be a single added token")
    return ids[0]


def special_token_ids(tokenizer) -> SpecialTokenIds:
    """Look up every id ChatterBox needs; raise TokenizerError if one is missing."""
    added = dict(
        vg=_single_id(tokenizer, VG_TOKEN),
        im_patch=_single_id(tokenizer, IMAGE_PATCH_TOKEN),
        im_start=_single_id(tokenizer, IMAGE_START_TOKEN),
        im_end=_single_id(tokenizer, IMAGE_END_TOKEN),
        bbox=_single_id(tokenizer, BBOX_TOKEN),
    )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise TokenizerError(f"tokenizer has no {name.replace('_id', '')}")
    return SpecialTokenIds(
        **added,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
    )


def image_token_string(num_patches: int = NUM_IMAGE_PATCHES) -> str:
    """What one `<image>` placeholder becomes in the prompt string."""
    return IMAGE_START_TOKEN + IMAGE_PATCH_TOKEN * num_patches + IMAGE_END_TOKEN


def expand_image_placeholder(text: str, num_patches: int = NUM_IMAGE_PATCHES) -> str:
    """Replace each `<image>` by `<im_start>` + patches + `<im_end>` (258 positions for CLIP-L/224)."""
    return text.replace(IMAGE_PLACEHOLDER, image_token_string(num_patches))


def load_tokenizer(path: str, model_max_length: int = 2048):
    """Load a LLaMA tokenizer from a local folder (never a hub) and add ChatterBox's tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=model_max_length, local_files_only=True)
    add_chatterbox_tokens(tokenizer)
    return tokenizer
