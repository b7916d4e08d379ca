#!/usr/bin/env python
"""Warm the region path up between the stages: from a stage-1 export, train the CLIP tower and the region
encoder (AdamW, constant rates, no language model) to name each referring region's kind, its colour and kind
(two softmax heads), or its category (one 18-way head) through a linear head on the region vector, then
save the model as an export that ``startup_stage2.py --set train.init_from=OUT`` starts from.

    python docs/results/tiny_recipe/region_warmup/warm_export.py OUT --targets kind|both|category
        [--steps 500] [--clip-lr 1e-3] [--region-lr 1e-4] [--export outputs/tiny_stage1/export]

Prints every 100 steps the head's accuracy on 8 batches of the referring stream drawn before training (they
come round again in later passes: a training curve, not a held-out score).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "region_path"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402
from kind_supervision import region_vectors  # noqa: E402
from lm_readout import region_names  # noqa: E402

CLASSES = {"kind": 3, "both": 6 + 3, "category": 18}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--export", default="outputs/tiny_stage1/export")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--targets", default="kind", choices=tuple(CLASSES))
    parser.add_argument("--clip-lr", type=float, default=1e-3, help="CLIP tower (0: frozen)")
    parser.add_argument("--region-lr", type=float, default=1e-4, help="region encoder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, model = trained_export.load(argparse.Namespace(export=args.export, set=[]))
    model.train()
    stream = trained_export.stream(cfg, model, "referring")
    held = [next(stream) for _ in range(8)]
    head = torch.nn.Linear(model.region_encoder.output_projection.out_features, CLASSES[args.targets])

    def logits_and_names(batch):
        names = region_names(model.tokenizer, batch)
        named = [i for i, name in enumerate(names) if name is not None]
        colour, kind = (torch.tensor([names[i][j] for i in named]) for j in (0, 1))
        return head(region_vectors(model, batch)[named]), colour, kind

    def loss_of(logits, colour, kind):
        if args.targets == "kind":
            return F.cross_entropy(logits, kind)
        if args.targets == "both":
            return F.cross_entropy(logits[:, :6], colour) + F.cross_entropy(logits[:, 6:], kind)
        return F.cross_entropy(logits, colour * 3 + kind)

    def kind_predicted(logits):
        return {"kind": logits.argmax(-1), "both": logits[:, 6:].argmax(-1), "category": logits.argmax(-1) % 3}[
            args.targets]

    optimizer = torch.optim.AdamW([{"params": head.parameters(), "lr": 1e-3},
                                   {"params": model.clip_tower.parameters(), "lr": args.clip_lr},
                                   {"params": model.region_encoder.parameters(), "lr": args.region_lr}],
                                  weight_decay=0.0)
    start = time.time()
    for step in range(1, args.steps + 1):
        loss = loss_of(*logits_and_names(next(stream)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            right = total = 0
            with torch.no_grad():
                for batch in held:
                    logits, _, kind = logits_and_names(batch)
                    right += int((kind_predicted(logits) == kind).sum())
                    total += len(kind)
            print(json.dumps({"step": step, "loss": round(loss.item(), 3), "kind_accuracy": round(right / total, 3),
                              "seconds": round(time.time() - start), **vars(args)}), flush=True)
    model.eval()
    model.save_pretrained(args.out)
    print("saved", args.out)


if __name__ == "__main__":
    main()
