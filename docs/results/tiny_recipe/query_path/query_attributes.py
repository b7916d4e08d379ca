#!/usr/bin/env python
"""Does a trained export's `[VG]` query carry the colour and the kind of the shape its question names?

Runs grounding batches of the training stream through the export, keeps the query of every "Where is the
<colour> <kind>? [VG]" question (the query-head output, and the LLM hidden state it is read from), and fits
a linear probe for the colour and one for the kind on three quarters of them (held out: every fourth).
Prints the held-out accuracy of each probe beside the share of the most frequent value.

    python docs/results/tiny_recipe/query_path/query_attributes.py EXPORT_DIR [--config small_stage2] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402

from chatterbox.train.query_warmup import NAMED  # noqa: E402  ("Where is the <colour> <kind>? ")



def on(device: torch.device, value):
    """A batch field on ``device`` (tensors, and lists of tensors such as the per-sample boxes)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(on(device, v) for v in value)
    return value


def probe(features: list[torch.Tensor], labels: list[str], steps: int = 500) -> dict:
    """Held-out accuracy of a linear softmax probe (standardised features, every fourth sample held out)."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(v) for v in labels])
    x = torch.stack(features).float()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    train = torch.arange(len(y)) % 4 != 0
    torch.manual_seed(0)
    weight = torch.zeros(x.shape[1], len(names), requires_grad=True)
    bias = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        logits = x[train] @ weight + bias
        (torch.nn.functional.cross_entropy(logits, y[train]) + 1e-3 * weight.pow(2).sum()).backward()
        opt.step()
    held_out = ((x[~train] @ weight + bias).argmax(1) == y[~train]).float().mean().item()
    most_frequent = max(labels.count(v) for v in names) / len(labels)
    return {"held_out": round(held_out, 3), "most_frequent": round(most_frequent, 3)}


def main() -> None:
    args = trained_export.parse_args(__doc__, batches=40)
    cfg, model = trained_export.load(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    caught = {}
    model.query_head.register_forward_hook(lambda m, i, o: caught.__setitem__("q", (i[0], o)))
    features = {"query": [], "hidden": []}
    colours, kinds = [], []
    batches = trained_export.stream(cfg, model, "grounding")
    for _ in range(args.batches):
        batch = next(batches)
        with torch.no_grad():
            model(**{k: on(device, v) for k, v in batch.items() if k != "sample_ids"})
        hidden, query = caught["q"]
        index = 0
        for row in range(batch["input_ids"].shape[0]):
            text = model.tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist())
            for before_vg in text.split("[VG]")[:-1]:  # one query per [VG], in order
                named = NAMED.search(before_vg)
                if named:
                    features["query"].append(query[index].cpu())
                    features["hidden"].append(hidden[index].cpu())
                    colours.append(named.group(1))
                    kinds.append(named.group(2))
                index += 1
        if index != query.shape[0]:
            raise RuntimeError(f"{index} [VG] in the text, {query.shape[0]} queries")
    result = {"export": args.export, "config": args.config, "set": args.set, "questions": len(colours)}
    for name, x in features.items():
        result[f"{name}_colour"] = probe(x, colours)
        result[f"{name}_kind"] = probe(x, kinds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
