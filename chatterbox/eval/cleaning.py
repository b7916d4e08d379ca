"""Upstream's post-processing of referring answers (``output/process.py`` and ``process_clean.py``).

* :func:`upstream_modify_output` (process.py) only reformats: ``text_output`` becomes ``sent`` as is.
  The "raw" rows of upstream's referring table are scored on this.
* :func:`clean_caption_upstream` (process_clean.py) edits the answer; the "cleaned" rows use it.

The cleaning is a scan, not a set of regexes, and its results depend on that scan. Upstream walks an
index ``j`` over ``range(len(original answer))`` while the answer shrinks under it, and at each ``j``
tests, in this order, whether the *current* string has at position ``j``:

1. ``" It is "``, ``"It is "``, ``"it is "``, ``"There is "`` -> delete it;
2. ``". "``, ``"."``, ``", "`` -> cut the string at ``j`` (drop the rest);
3. ``"at region0 "``, ``"istant: "`` -> delete it;
4. ``"is "`` -> keep only what follows it and stop.

Each test sees the string as left by the tests before it at the same ``j``. Quirks, kept on purpose
because the published "cleaned" numbers depend on them:

* ``"is "`` matches inside words and fires before the "." cut is reached:
  ``" It is a man with a bat in his hand."`` -> ``"hand."``, ``"a man on a tennis court."`` ->
  ``"court."``, ``" It is the woman who is sitting."`` -> ``"sitting."`` (the trailing "." stays;
  the PTB step drops it later).
* ``" It is "`` inside a sentence takes both its spaces: ``"xx It is y"`` -> ``"xxy"``; ``"istant: "``
  also fires inside words: ``"Assistant: a man"`` -> ``"Assa man"``.
* After an edit at ``j``, the text that slid into position ``j`` is tested only by the rules after
  the one that fired; once the string is shorter than ``j`` nothing matches, though the loop still
  runs to the original length.
* Everything from the first "." or ", " on is dropped, so "cleaned" is not simply "strip 'It is' and
  the final period": multi-clause answers are truncated (``" It is a dog, brown."`` -> ``"a dog"``).

On upstream's RefCOCOg outputs this reproduces every published ``clean_output`` sentence exactly.
"""
from __future__ import annotations

from typing import Iterable, Mapping

__all__ = ["clean_caption_upstream", "upstream_modify_output", "upstream_clean_output"]

_DELETE, _CUT, _KEEP_AFTER = "delete", "cut", "keep_after"

# (pattern, action) in the order upstream tests them at each position.
_UPSTREAM_RULES: tuple[tuple[str, str], ...] = (
    (" It is ", _DELETE),
    ("It is ", _DELETE),
    ("it is ", _DELETE),
    ("There is ", _DELETE),
    (". ", _CUT),
    (".", _CUT),
    (", ", _CUT),
    ("at region0 ", _DELETE),
    ("istant: ", _DELETE),
    ("is ", _KEEP_AFTER),
)


def clean_caption_upstream(text: str) -> str:
    """process_clean.py applied to one answer (see the module docstring for the rules and quirks)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    current = text
    for j in range(len(text)):
        for pattern, action in _UPSTREAM_RULES:
            if current[j : j + len(pattern)] != pattern:
                continue
            if action == _DELETE:
                current = current[:j] + current[j + len(pattern) :]
            elif action == _CUT:
                current = current[:j]
            else:
                return current[j + len(pattern) :]
    return current


def _predictions(entries: Iterable[Mapping], transform) -> dict:
    out = []
    for i, entry in enumerate(entries):
        for key in ("text_output", "ref_id"):
            if key not in entry:
                raise KeyError(f"raw_output entry {i}: missing field {key!r}")
        if not isinstance(entry["text_output"], str):
            raise TypeError(f"raw_output entry {i}.text_output: expected a string, got {entry['text_output']!r}")
        out.append({"sent": transform(entry["text_output"]), "ref_id": entry["ref_id"]})
    return {"predictions": out}


def upstream_modify_output(raw_entries: Iterable[Mapping]) -> dict:
    """raw_output entries -> ``{"predictions": [{"sent": text_output, "ref_id"}]}`` (process.py)."""
    return _predictions(raw_entries, lambda s: s)


def upstream_clean_output(raw_entries: Iterable[Mapping]) -> dict:
    """raw_output entries -> ``{"predictions": [{"sent": cleaned text_output, "ref_id"}]}`` (process_clean.py)."""
    return _predictions(raw_entries, clean_caption_upstream)
