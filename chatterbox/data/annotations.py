"""The box-annotation strings inside CB-300K / CB-materials turns (spec/upstream.md §3.3).

A turn may carry one box group, normally at its end::

    "What is the man holding? <man:[12, 40, 88, 200], man_2:[90.5, 41, 140, 210]>"

Parsing is a strict regular expression (upstream evaluates the numbers with ``eval``). Upstream cuts
the turn text at the group's ``<`` and ignores anything after it; so do we. Groups that upstream's
reader deliberately treats as "no box" (placeholders such as ``[0,0,0,0]`` or ``[x1, y1, x2, y2]``,
question marks, ``;`` separators, empty brackets) are reported as *unusable*, not as errors: such a
turn is never used as a box source. Anything else that looks like a group but does not parse raises
`AnnotationError`; readers re-raise it as a DataError naming file, record and field.

The ``<it>`` / ``<region>`` placeholders of CB-REF / CB-MRG and our own ``<image>`` / ``<bbox>`` tokens
are not box groups.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from chatterbox.boxes import convert_layout
from chatterbox.data.records import NamedBox

PLACEHOLDERS = ("<it>", "<region>", "<image>", "<bbox>")

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_ENTRY = rf"\s*([^<>:\[\],]+?)\s*:\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]\s*"
_ENTRY_RE = re.compile(_ENTRY)
_GROUP_RE = re.compile(rf"^<{_ENTRY}(?:,{_ENTRY})*>$")
# A candidate group: a <...> span that is not one of the placeholders.
_CANDIDATE_RE = re.compile(r"<[^<>]*>")
# Upstream's "no box" forms (§3.3): placeholder coordinates ("x1", "?", empty or all-zero brackets) and
# ";" separators. Upstream looks for the markers anywhere in the group, so an object named "box1" or
# "what?" lost its box there; here the coordinate markers count only inside the brackets.
_BRACKETS_RE = re.compile(r"\[([^\]]*)\]")
_ZERO_BOX_RE = re.compile(r"^\s*0\s*,\s*0\s*,\s*0\s*,\s*0\s*$")


def _is_no_box_form(group: str) -> bool:
    if ";" in group:
        return True
    return any("x1" in inside or "?" in inside or not inside.strip() or _ZERO_BOX_RE.match(inside)
               for inside in _BRACKETS_RE.findall(group))


class AnnotationError(ValueError):
    """A `<...>` box group that is neither valid nor one of upstream's known "no box" forms."""


@dataclass
class ParsedText:
    text: str  # the turn text before the box group, stripped
    boxes: list[NamedBox]  # boxes of the first group (xyxy, original pixels, as written)
    unusable_group: bool = False  # a group was present but is a known "no box" form
    has_group: bool = False


def find_box_group(text: str) -> re.Match | None:
    for m in _CANDIDATE_RE.finditer(text):
        if m.group(0) not in PLACEHOLDERS:
            return m
    return None


def parse_group(group: str, layout: str = "xyxy") -> list[NamedBox] | None:
    """Parse one ``<name:[a, b, c, d], ...>`` group; None for a known "no box" form; raise otherwise.

    ``layout`` is how the file writes boxes ("xyxy" for CB-300K / CB-coco, "xywh" for the CB-refcoco
    files); the result is always xyxy in pixels.
    """
    if _is_no_box_form(group):
        return None
    if not _GROUP_RE.match(group):
        raise AnnotationError(f"malformed box group {group!r} (expected '<name:[x1, y1, x2, y2], ...>')")
    boxes = []
    for m in _ENTRY_RE.finditer(group[1:-1]):
        name = m.group(1).strip()
        coords = tuple(float(v) for v in m.group(2, 3, 4, 5))
        if not all(math.isfinite(c) for c in coords):
            raise AnnotationError(f"box group {group!r}: non-finite coordinate")
        if layout != "xyxy":
            coords = tuple(convert_layout(torch.tensor(coords, dtype=torch.float64), layout, "xyxy").tolist())
        boxes.append(NamedBox(name=name, box_xyxy_abs=coords))
    return boxes


def split_box_group(text: str, layout: str = "xyxy") -> ParsedText:
    """Cut ``text`` at its first box group and parse that group."""
    m = find_box_group(text)
    if m is None:
        return ParsedText(text=text.strip(), boxes=[])
    boxes = parse_group(m.group(0), layout)
    return ParsedText(text=text[: m.start()].strip(), boxes=boxes or [], unusable_group=boxes is None, has_group=True)


def strip_box_groups(text: str) -> str:
    """Remove every box group but keep the surrounding text (VQA use of CB data)."""
    out, pos = [], 0
    for m in _CANDIDATE_RE.finditer(text):
        if m.group(0) in PLACEHOLDERS:
            continue
        out.append(text[pos: m.start()])
        pos = m.end()
    out.append(text[pos:])
    return re.sub(r"\s+([.,?!])", r"\1", re.sub(r"[ \t]{2,}", " ", "".join(out))).strip()


def format_box_group(boxes: list[NamedBox], decimals: int = 0) -> str:
    """Inverse of `parse_group` (used by the synthetic corpus and tests)."""
    def fmt(v: float) -> str:
        return str(int(round(v))) if decimals == 0 else f"{v:.{decimals}f}"

    entries = [f"{b.name}:[{', '.join(fmt(v) for v in b.box_xyxy_abs)}]" for b in boxes]
    return "<" + ", ".join(entries) + ">"
