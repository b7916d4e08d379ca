#!/usr/bin/env python
"""Can the language side put both words into the [VG] query when asked to directly?

A fresh (or exported) model; the vision branch is bypassed: two linear heads read the colour and the kind of
each "Where is the <colour> <kind>? [VG]" question from its query, and the language model, CLIP, projector and
query head train with the heads on their cross-entropy (AdamW). Every ``--every`` steps, accuracy on fresh
batches. If both reach ~1 quickly, the language side can carry both words and the grounding loss is what fails
to ask for the second.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402
from oracle_query import COLOURS, KINDS, named_queries  # noqa: E402
from query_attributes import on  # noqa: E402


class _Stop(Exception):
    pass


def main() -> None:
    def own(parser):
        parser.add_argument("--steps", type=int, default=400)
        parser.add_argument("--every", type=int, default=50)
        parser.add_argument("--lr", type=float, default=2e-3)
        parser.add_argument("--objective", choices=("attributes", "words"), default="attributes",
                            help="attributes: colour and kind heads; words: a head recalls every token of the "
                                 "--window tokens before [VG] (multi-label), no labels but the text")
        parser.add_argument("--window", type=int, default=16)
        parser.add_argument("--save", default="", help="write the model (heads left out) as an export here")

    args = trained_export.parse_args(__doc__, batches=10, add_arguments=own)
    cfg, model = trained_export.load(args)
    model.train()
    caught = {}

    def grab(module, inputs, output):
        caught["q"] = output
        raise _Stop

    model.query_head.register_forward_hook(grab)
    heads = torch.nn.ModuleDict({"colour": torch.nn.LazyLinear(len(COLOURS)), "kind": torch.nn.LazyLinear(len(KINDS))})
    trainable = [p for n, p in model.named_parameters() if not n.startswith("vision")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    batches = trained_export.stream(cfg, model, "grounding")

    def queries(batch):
        try:
            model(**{k: on("cpu", v) for k, v in batch.items() if k != "sample_ids"})
        except _Stop:
            pass
        named = [n for n in named_queries(model, batch) if n is not None]
        idx = torch.tensor([n[1] for n in named])
        c = torch.tensor([COLOURS.index(n[2]) for n in named])
        k = torch.tensor([KINDS.index(n[3]) for n in named])
        return caught["q"][idx], c, k

    vocab = model.causal_lm.get_input_embeddings().weight.shape[0]
    heads["words"] = torch.nn.LazyLinear(vocab)
    vg = model.token_ids.vg

    def recalled(batch):
        """Per [VG] of the batch, in order: multi-hot of the token ids of the --window tokens before it."""
        rows = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            ids = ids[mask.bool()]
            for pos in (ids == vg).nonzero().flatten().tolist():
                target = torch.zeros(vocab)
                window = ids[max(0, pos - args.window):pos]
                target[window[(window >= 0) & (window < vocab)]] = 1.0
                rows.append(target)
        return torch.stack(rows)

    q, c, k = queries(next(batches))
    heads["colour"](q), heads["kind"](q), heads["words"](q)
    opt = torch.optim.AdamW(trainable + list(heads.parameters()), lr=args.lr, weight_decay=0.0)
    for step in range(1, args.steps + 1):
        batch = next(batches)
        if args.objective == "words":
            try:
                model(**{k_: on("cpu", v) for k_, v in batch.items() if k_ != "sample_ids"})
            except _Stop:
                pass
            target = recalled(batch)  # multi-label softmax: every recalled token equally likely
            log_p = torch.log_softmax(heads["words"](caught["q"]), dim=1)
            loss = -((target / target.sum(1, keepdim=True)) * log_p).sum(1).mean()
        else:
            q, c, k = queries(batch)
            loss = (torch.nn.functional.cross_entropy(heads["colour"](q), c)
                    + torch.nn.functional.cross_entropy(heads["kind"](q), k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 and args.objective == "words":
            print(json.dumps({"step": step, "loss": round(loss.item(), 4)}), flush=True)
        elif step % args.every == 0:
            hits = {"colour": [0, 0], "kind": [0, 0]}
            with torch.no_grad():
                for _ in range(args.batches):
                    q, c, k = queries(next(batches))
                    for name, y in (("colour", c), ("kind", k)):
                        hits[name][0] += (heads[name](q).argmax(1) == y).sum().item()
                        hits[name][1] += len(y)
            print(json.dumps({"step": step, "loss": round(loss.item(), 3),
                              **{n: round(h / t, 3) for n, (h, t) in hits.items()}}), flush=True)
    if args.save:
        model.save_pretrained(args.save)
        print("saved", args.save)


if __name__ == "__main__":
    main()
