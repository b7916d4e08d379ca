"""A tiny LLaMA-style SentencePiece tokenizer for the `tiny` preset and the tests.

The real presets load LLaMA-2's tokenizer from a local folder. The tiny preset must run on a fresh
machine with no hub access, so it trains a small BPE model (byte fallback, LLaMA's special ids
unk=0, bos=1, eos=2) on a built-in corpus in well under a second and caches it in a folder.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from chatterbox.conversation import VICUNA_V1_1

# Words the synthetic corpus, the prompt template and upstream's question templates use, so the tiny
# tokenizer encodes them compactly; anything else still encodes through byte fallback.
_CORPUS_LINES = [
    VICUNA_V1_1.system,
    "USER: ASSISTANT: Where is the red circle? It is at the top left of the image.",
    "What is it <bbox>? It is a blue square. There is a green triangle in this region.",
    "Could you please give me a detailed description of these areas? Sure, there is a yellow ellipse.",
    "Which part of your overall description corresponds to the specific area of the image?",
    "What can you tell me about the region indicated by region1 in the image?",
    "Please give a brief answer in one sentence less than 10 words.",
    "The image provides an overview of the picture. This is a small dog on the left, a large cat on the right.",
    "red green blue yellow purple orange white black gray circle square triangle ellipse rectangle star",
    "person dog cat car truck bus bicycle chair table bottle cup bird horse sheep cow umbrella man woman",
    "top bottom left right center middle above below near next to behind in front of holding wearing",
    "I do not know. Yes. No. It is the one on the left. The object is next to the other object.",
    "0 1 2 3 4 5 6 7 8 9 10 100 , . ? ! : ; ' \" ( ) [ ] < >",
]


def tiny_corpus() -> str:
    # Repetition gives BPE enough counts to learn whole words from a short corpus.
    return "\n".join(_CORPUS_LINES * 20) + "\n"


def train_tiny_sentencepiece(model_prefix: str, vocab_size: int = 1000) -> str:
    """Train the BPE model; return the path of the written ``.model`` file."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=io.StringIO(tiny_corpus()),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model_prefix + ".model"


def tiny_tokenizer_fingerprint(vocab_size: int = 1000) -> str:
    """Changes whenever the corpus, the vocabulary size or SentencePiece changes (cache key)."""
    import hashlib

    import sentencepiece

    text = f"{vocab_size}|{sentencepiece.__version__}|{tiny_corpus()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Write a folder loadable by ``transformers.AutoTokenizer`` (a LLaMA tokenizer); reuse it if present.

    The folder appears atomically (built beside it, then renamed), so processes that build it at the
    same time (several ranks) never read a half-written tokenizer.
    """
    out = Path(out_dir)
    if (out / "tokenizer_config.json").is_file():
        return out
    from transformers import LlamaTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        model_file = train_tiny_sentencepiece(os.path.join(tmp, "tokenizer"), vocab_size)
        staging = Path(tmp) / "hf"
        staging.mkdir()
        os.replace(model_file, staging / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(str(staging), legacy=False, add_bos_token=True, add_eos_token=False)
        tokenizer.save_pretrained(str(staging))
        try:
            os.rename(staging, out)
        except OSError:
            if not (out / "tokenizer_config.json").is_file():  # not a concurrent builder that won: a real error
                raise
    return out


def default_tiny_tokenizer_dir() -> Path:
    """Per-user cache of the tiny tokenizer, keyed by its fingerprint (``$CHATTERBOX_CACHE`` overrides)."""
    root = Path(os.environ.get("CHATTERBOX_CACHE", Path.home() / ".cache" / "chatterbox"))
    return root / f"tiny_tokenizer-{tiny_tokenizer_fingerprint()}"
