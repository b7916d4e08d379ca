"""Shared helpers for readers: JSON/pickle loading and field checks that raise DataError."""
from __future__ import annotations

import json
import math
import os
import pickle
from typing import Any, Callable

from chatterbox.boxes import BoxError, as_box_tensor, convert_layout, validate_xyxy
from chatterbox.data.errors import BadRecordPolicy, DataError


def require_file(path: str) -> None:
    if not path:
        raise DataError("no path configured", "<config>", None, "data.paths")
    if not os.path.isfile(path):
        raise DataError("file not found", path)


def load_json(path: str) -> Any:
    require_file(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", path) from e
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e}", path) from e


def load_pickle(path: str) -> Any:
    require_file(path)
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # refer's pickles were written by Python 2
    except Exception as e:  # pickle raises many unrelated types for a corrupt file
        raise DataError(f"cannot unpickle: {type(e).__name__}: {e}", path) from e


def require(obj: Any, key: str, kind: type | tuple, file: str, record: int | str, field_prefix: str = "") -> Any:
    name = f"{field_prefix}{key}"
    if not isinstance(obj, dict):
        raise DataError(f"expected an object, got {type(obj).__name__}", file, record, field_prefix.rstrip(".") or None)
    if key not in obj:
        raise DataError("missing", file, record, name)
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"expected {expected}, got {type(value).__name__} {value!r:.60}", file, record, name)
    return value


def read_image_wh(item: dict, file: str, record: int | str) -> tuple[int, int] | None:
    """A record's optional ``image_wh`` ([width, height], positive integers): boxes are then checked against
    it as they are read, and it against the image file when that is loaded."""
    if "image_wh" not in item:
        return None
    wh = item["image_wh"]
    if not (isinstance(wh, list) and len(wh) == 2 and all(isinstance(v, int) and v > 0 for v in wh)):
        raise DataError(f"expected [width, height] positive integers, got {wh!r}", file, record, "image_wh")
    return wh[0], wh[1]


def top_level_list(data: Any, path: str, key: str | None) -> list:
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"expected a top-level object with key {key!r}", path, None, key)
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"expected a list, got {type(data).__name__}", path, None, key)
    return data


def box_to_xyxy(box: Any, layout: str, file: str, record: int | str, field: str,
                image_size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """A box written in ``layout`` pixels -> validated xyxy pixels (finite, positive size, inside the image)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise DataError(f"expected 4 numbers, got {box!r:.80}", file, record, field)
    if not all(math.isfinite(v) for v in box):
        raise DataError(f"non-finite coordinate in {box}", file, record, field)
    boxes_xyxy_abs = convert_layout(as_box_tensor([box]), layout, "xyxy")
    width, height = image_size if image_size else (None, None)
    try:
        validate_xyxy(boxes_xyxy_abs, width, height, where=field)
    except BoxError as e:
        raise DataError(str(e), file, record, field) from e
    return tuple(boxes_xyxy_abs[0].tolist())


def read_categories(data: Any, path: str, file: str) -> dict[int, str]:
    """A COCO-style ``categories`` list as ``{id: name}``."""
    categories = {}
    for i, cat in enumerate(top_level_list(data, path, "categories")):
        categories[require(cat, "id", int, file, f"categories[{i}]")] = require(cat, "name", str, file,
                                                                                f"categories[{i}]")
    return categories


def require_image_entry(img: Any, file: str, record: str) -> int:
    """Check a COCO-style ``images`` entry (int ``id``, str ``file_name``, positive int ``width`` and
    ``height``); return its id."""
    image_id = require(img, "id", int, file, record)
    require(img, "file_name", str, file, record)
    for key in ("width", "height"):
        if require(img, key, int, file, record) <= 0:
            raise DataError("must be positive", file, record, key)
    return image_id


def require_known(obj: Any, key: str, known, file: str, record: str, what: str) -> int:
    """An int id field that must name an entry of ``known`` (e.g. an annotation's ``image_id``)."""
    value = require(obj, key, int, file, record)
    if value not in known:
        raise DataError(f"unknown {what} {value}", file, record, key)
    return value


def read_records(items: list, path: str, parse: Callable[[Any, int], Any], policy: BadRecordPolicy | None) -> list:
    """Parse every item; apply the bad-record policy to DataErrors (default: raise)."""
    policy = policy or BadRecordPolicy()
    out = []
    for index, item in enumerate(items):
        try:
            record = parse(item, index)
        except DataError as e:
            policy.handle(e)
            continue
        if record is not None:
            out.append(record)
    return out


def display_name(path: str) -> str:
    """Short file name for sample ids: the last two path components."""
    parts = os.path.normpath(path).split(os.sep)
    return "/".join(parts[-2:])
