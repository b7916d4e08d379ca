#!/usr/bin/env python
"""Do a trained export's `[VG]` queries tell the questions about one image apart?

Runs grounding batches of the quickstart's corpus (data/synthetic; most are dialogues asking for several
shapes of one image) through the export and reports the mean cosine similarity of the query-head outputs
(and of the LLM hidden states they are read from) between two questions about the same image and between
questions about different images. A query that carries the words differs within an image about as much as
across images; a query that has collapsed is the same vector for every question.

    python docs/results/tiny_recipe/query_path/query_spread.py EXPORT_DIR [--set KEY=VALUE ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402


def main() -> None:
    args = trained_export.parse_args(__doc__, batches=6)
    cfg, model = trained_export.load(args)
    caught = {}
    model.query_head.register_forward_hook(lambda m, i, o: caught.__setitem__("q", (i[0], o)))
    pairs = {"query": ([], []), "hidden": ([], [])}
    batches = trained_export.stream(cfg, model, "grounding")
    for _ in range(args.batches):
        batch = next(batches)
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "sample_ids"})
        hidden, query = caught["q"]
        counts = (batch["input_ids"] == model.token_ids.vg).sum(1)
        rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
        same = rows[:, None] == rows[None, :]
        other = ~torch.eye(len(rows), dtype=torch.bool)
        for name, x in (("query", query), ("hidden", hidden)):
            x = torch.nn.functional.normalize(x.float(), dim=-1)
            cos = x @ x.T
            pairs[name][0].append(cos[same & other])
            pairs[name][1].append(cos[~same])
    result = {"export": args.export, "set": args.set}
    for name, (within, across) in pairs.items():
        within, across = torch.cat(within), torch.cat(across)
        result[f"{name}_cosine_same_image"] = round(within.mean().item(), 3)
        result[f"{name}_cosine_other_images"] = round(across.mean().item(), 3)
        result["pairs_same_image"] = len(within)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
