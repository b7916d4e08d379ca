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

import argparse
import json

import torch

from chatterbox.config import load_config
from chatterbox.model.weights import load_export_weights
from chatterbox.train.distributed import init_distributed
from chatterbox.train.run import build_model, build_streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override matching the export (e.g. model.clip.patch_size=7)")
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config("tiny_stage2", ["train.init_from=", *args.set])
    model = build_model(cfg).eval()
    load_export_weights(model, args.export)
    caught = {}
    model.query_head.register_forward_hook(lambda m, i, o: caught.__setitem__("q", (i[0], o)))
    pairs = {"query": ([], []), "hidden": ([], [])}
    batches = iter(build_streams(cfg, model.tokenizer, init_distributed("cpu"))["grounding"])
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
