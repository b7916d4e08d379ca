#!/usr/bin/env python
"""Can the tiny preset's CLIP tower + region encoder learn a region's kind (circle/square/triangle) at all?

Trains them from their random init with a linear head and a cross-entropy loss on the kind named in each
referring sample (the synthetic corpus of the quickstart, data/synthetic), with AdamW, and reports every
100 steps the held-out kind accuracy and the share of the region encoder's pooled activations that are
alive (> 0 after the ReLU that follows the sum of its per-level 3x3 convs, upstream's "pconvs").

    python docs/results/tiny_recipe/region_path/kind_supervision.py [--region-lr 1e-4] [--level-conv-std 0.06]
        [--clip-lr 0] [--set train.init_from=outputs/tiny_stage1]

No language model is involved: this isolates the region path from the lookup the LLM must learn.
"""
from __future__ import annotations

import argparse
import json
import re

import torch

from chatterbox.config import load_config
from chatterbox.train.distributed import init_distributed
from chatterbox.train.run import build_model, build_streams

KINDS = ("circle", "square", "triangle")
NAME = re.compile(r"(red|green|blue|yellow|purple|orange) (circle|square|triangle)")


def kind_labels(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(kind index, region index) of every region whose answer names a shape."""
    labels, regions, k = [], [], 0
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row]
        text = model.tokenizer.decode(ids[ids != model.tokenizer.pad_token_id])
        for after in text.split("<bbox>")[1:]:
            match = NAME.search(after)
            if match:
                labels.append(KINDS.index(match.group(2)))
                regions.append(k)
            k += 1
    return torch.tensor(labels), torch.tensor(regions)


def region_vectors(model, batch) -> torch.Tensor:
    features = model.clip_tower(batch["images_clip"])
    rows = model._row_to_image(batch["offset"], batch["input_ids"].shape[0], batch["images_clip"].shape[0])
    return model._region_vectors(features, batch["region_boxes_xyxy_clip_norm"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3, help="the head (and CLIP unless --clip-lr)")
    parser.add_argument("--clip-lr", type=float, default=None, help="CLIP tower (0: frozen)")
    parser.add_argument("--region-lr", type=float, default=1e-3, help="region encoder")
    parser.add_argument("--level-conv-std", type=float, default=0.01, help="init std of the per-level convs "
                        "(0.01: upstream's, written for 1024 channels)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (e.g. model.clip.patch_size=7)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config("tiny_stage2", ["train.init_from=", *args.set])
    model = build_model(cfg).train()
    for conv in model.region_encoder.level_convs:
        torch.nn.init.normal_(conv.weight, std=args.level_conv_std)
    alive = {}
    model.region_encoder.roi_projection.register_forward_hook(
        lambda module, inputs, output: alive.__setitem__("share", (inputs[0] > 0).float().mean().item()))
    stream = iter(build_streams(cfg, model.tokenizer, init_distributed("cpu"))["referring"])
    head = torch.nn.Linear(model.region_encoder.output_projection.out_features, len(KINDS))
    optimizer = torch.optim.AdamW([
        {"params": list(head.parameters()), "lr": args.lr},
        {"params": list(model.clip_tower.parameters()), "lr": args.lr if args.clip_lr is None else args.clip_lr},
        {"params": list(model.region_encoder.parameters()), "lr": args.region_lr}])
    held_out = [next(stream) for _ in range(10)]

    def accuracy() -> float:
        right = total = 0
        with torch.no_grad():
            for batch in held_out:
                labels, regions = kind_labels(model, batch)
                right += int((head(region_vectors(model, batch)[regions]).argmax(-1) == labels).sum())
                total += len(labels)
        return right / total

    for step in range(1, args.steps + 1):
        batch = next(stream)
        labels, regions = kind_labels(model, batch)
        loss = torch.nn.functional.cross_entropy(head(region_vectors(model, batch)[regions]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (1, 10) or step % 100 == 0:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "alive": round(alive["share"], 3),
                              "held_out_kind_accuracy": round(accuracy(), 3), **vars(args)}), flush=True)


if __name__ == "__main__":
    main()
