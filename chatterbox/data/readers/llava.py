"""LLaVA-Instruct-150K: ``llava_instruct_150k.json`` = ``[{id, image: "<coco2017 train file>",
conversations: [{from: human|gpt, value}]}]``. Used verbatim (the `<image>` placeholder is already in
the first human message, before or after the text)."""
from __future__ import annotations

import os

from chatterbox.data.errors import BadRecordPolicy, DataError
from chatterbox.data.readers.common import display_name, load_json, read_records, require, top_level_list
from chatterbox.data.records import DialogueRecord, DialogueTurn
from chatterbox.tokens import IMAGE_PLACEHOLDER


def read_llava(path: str, image_dir: str, policy: BadRecordPolicy | None = None) -> list[DialogueRecord]:
    items = top_level_list(load_json(path), path, None)
    file = display_name(path)

    def parse(item, index):
        image = require(item, "image", str, file, index)
        conv = require(item, "conversations", list, file, index)
        if not conv:
            raise DataError("empty dialogue", file, index, "conversations")
        if len(conv) % 2:
            raise DataError(f"odd number of messages ({len(conv)})", file, index, "conversations")
        turns = []
        for k in range(0, len(conv), 2):
            values = []
            for j, role in ((k, "human"), (k + 1, "gpt")):
                prefix = f"conversations[{j}]."
                if require(conv[j], "from", str, file, index, prefix) != role:
                    raise DataError(f"expected {role!r}", file, index, prefix + "from")
                value = require(conv[j], "value", str, file, index, prefix).strip()
                if not value:
                    raise DataError("empty message", file, index, prefix + "value")
                values.append(value)
            turns.append(DialogueTurn(question=values[0], answer=values[1]))
        n_images = sum(t.question.count(IMAGE_PLACEHOLDER) + t.answer.count(IMAGE_PLACEHOLDER) for t in turns)
        if n_images != 1 or IMAGE_PLACEHOLDER not in turns[0].question:
            raise DataError(f"expected exactly one {IMAGE_PLACEHOLDER}, in the first human message (found {n_images})",
                            file, index, "conversations")
        return DialogueRecord(file=file, index=index, image_path=os.path.join(image_dir, image), turns=turns)

    return read_records(items, file, parse, policy)
