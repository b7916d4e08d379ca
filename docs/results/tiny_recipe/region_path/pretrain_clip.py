#!/usr/bin/env python
"""Pretrain the tiny preset's CLIP vision tower on the synthetic corpus, as a stand-in for upstream's
pretrained CLIP ViT-L/14 (an investigation: the quickstart does not use it, see ../README.md).

Every shape in the corpus's training split (COCO 2017 instances) is pooled with RoIAlign (4x4 cells) from
the tower's patch grid at the layer the language model reads (``model.clip.image_feature_layer``) and
classified into its category (colour and kind) by a linear head that is then thrown away. The tower is
written with ``save_pretrained``, the layout ``model.clip.clip_path`` loads; held-out accuracy (the val
split) per word every 100 steps goes to the log and to ``pretraining.json`` beside the weights.

    python docs/results/tiny_recipe/region_path/pretrain_clip.py --out /tmp/tiny_clip --set model.clip.patch_size=7
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from chatterbox.config import load_config
from chatterbox.data.readers.coco import read_coco_instances
from chatterbox.data.transforms import clip_image, load_image
from chatterbox.model.clip_tower import clip_vision_config

ROI_SIDE = 4


def load_split(coco_dir: Path, split: str, image_size: int):
    """Every image of one split as a CLIP input (squashed), its boxes normalised xyxy, their category names."""
    instances = read_coco_instances(str(coco_dir / "annotations" / f"instances_{split}.json"), str(coco_dir / split))
    images, boxes, names = [], [], []
    for record in instances.records:
        if not record.regions:
            continue
        img = load_image(record.image_path, f"{instances.file}#{record.index}", record.image_size)
        images.append(clip_image(img, image_size, "squash")[0])
        width, height = record.image_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes.append(torch.tensor([r.box_xyxy_abs for r in record.regions], dtype=torch.float32) / scale)
        names.append([r.text for r in record.regions])
    return torch.stack(images), boxes, names, instances.categories


class ShapeClassifier(torch.nn.Module):
    def __init__(self, clip_cfg, num_classes: int):
        super().__init__()
        from transformers import CLIPVisionModel

        self.tower = CLIPVisionModel(clip_vision_config(clip_cfg))
        self.layer = clip_cfg.image_feature_layer
        self.head = torch.nn.Linear(clip_cfg.hidden_size * ROI_SIDE ** 2, num_classes)

    def forward(self, images, boxes):
        tokens = self.tower(pixel_values=images, output_hidden_states=True).hidden_states[self.layer][:, 1:]
        grid = int(round(tokens.shape[1] ** 0.5))
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)
        pooled = roi_align(fmap, [b * grid for b in boxes], output_size=ROI_SIDE, sampling_ratio=2, aligned=True)
        return self.head(pooled.flatten(1))


def accuracy(model, images, boxes, labels, names, batch=64) -> dict:
    right = {"colour": 0, "kind": 0, "category": 0}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            predicted = model(images[start:start + batch], boxes[start:start + batch]).argmax(-1).tolist()
            for p, t in zip(predicted, torch.cat(labels[start:start + batch]).tolist()):
                (pc, pk), (tc, tk) = names[p].split(), names[t].split()
                right["colour"] += pc == tc
                right["kind"] += pk == tk
                right["category"] += p == t
    model.train()
    total = sum(len(t) for t in labels)
    return {f"held_out_{k}_accuracy": round(v / total, 4) for k, v in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    args = parser.parse_args()
    cfg = load_config("tiny_stage1", args.overrides)
    coco_dir = Path(cfg.data.paths.coco2017_dir)
    start = time.time()
    images, boxes, train_names, categories = load_split(coco_dir, "train2017", cfg.model.clip.image_size)
    val_images, val_boxes, val_names, _ = load_split(coco_dir, "val2017", cfg.model.clip.image_size)
    names = [categories[i] for i in sorted(categories)]
    index = {name: i for i, name in enumerate(names)}
    labels = [torch.tensor([index[n] for n in row]) for row in train_names]
    val_labels = [torch.tensor([index[n] for n in row]) for row in val_names]
    torch.manual_seed(0)
    model = ShapeClassifier(cfg.model.clip, len(names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) * 0.5
                                                 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(0)
    log = []
    for step in range(1, args.steps + 1):
        pick = torch.randint(len(images), (args.batch_size,), generator=generator).tolist()
        loss = F.cross_entropy(model(images[pick], [boxes[i] for i in pick]), torch.cat([labels[i] for i in pick]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            log.append({"step": step, "loss": round(loss.item(), 4),
                        **accuracy(model, val_images, val_boxes, val_labels, names),
                        "seconds": round(time.time() - start, 1)})
            print(json.dumps(log[-1]), flush=True)
    model.tower.save_pretrained(args.out)
    Path(args.out, "pretraining.json").write_text(json.dumps({"overrides": args.overrides, "args": vars(args),
                                                               "log": log}, indent=2))


if __name__ == "__main__":
    main()
