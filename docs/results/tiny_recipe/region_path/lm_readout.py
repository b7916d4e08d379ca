#!/usr/bin/env python
"""Does the reply learn to name a region's colour and kind through the language model?

Trains the tiny stage-2 model from an export on the referring stream alone, with stage 2's trainable set
(LoRA, embed_tokens and lm_head at 3x the rate, the region encoder at 0.1x, CLIP at 1x, the base frozen)
and plain AdamW at stage 2's rate, and reports every 100 steps the teacher-forced accuracy of the colour and
kind words of 8 batches of that stream drawn before training (``--set data.paths...``: another corpus). They
come round again in later epochs: a learning curve, not a held-out score (the evaluation commands give those).

    python docs/results/tiny_recipe/region_path/lm_readout.py real|oracle [--export DIR] [--steps N]
        [--set KEY=VALUE ...]

``oracle`` replaces every region vector by a fixed random vector of its colour plus one of its kind (each
N(0, 1) per dimension, about the norm the trained region vectors reach): what the language model can learn
when the region vector carries both.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from kind_gradient import COLOURS, KINDS, word_positions
from kind_supervision import NAME

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402

from chatterbox.model.lora import apply_trainable_policy, parameter_group  # noqa: E402

LR, LR_SCALE = 1e-3, {"lora": 3, "embed_tokens": 3, "lm_head": 3, "region_encoder": 0.1}
FORWARD_KEYS = ("input_ids", "attention_mask", "labels", "images_clip", "images_dino", "offset", "image_sizes_hw",
                "region_boxes_xyxy_clip_norm", "grounding_targets_cxcywh_norm", "task", "sample_ids")


def region_names(tokenizer, batch) -> list[tuple[int, int] | None]:
    """(colour, kind) named after each `<bbox>` of the batch, in the order the region vectors come."""
    names = []
    for ids in batch["input_ids"]:
        text = tokenizer.decode(ids[ids != tokenizer.pad_token_id])
        for after in text.split("<bbox>")[1:]:
            match = NAME.search(after)
            names.append((COLOURS.index(match.group(1)), KINDS.index(match.group(2))) if match else None)
    return names


def use_oracle_regions(model, current: dict) -> None:
    generator = torch.Generator().manual_seed(1)
    width = model.region_encoder.output_projection.out_features
    colour_vectors, kind_vectors = torch.randn(6, width, generator=generator), torch.randn(3, width, generator=generator)
    built = model._region_vectors

    def oracle(*args):
        vectors = built(*args)
        rows = [torch.zeros(width) if name is None else colour_vectors[name[0]] + kind_vectors[name[1]]
                for name in current["names"][:vectors.shape[0]]]
        return torch.stack(rows).to(vectors)

    model._region_vectors = oracle


def word_accuracy(model, batches, current: dict) -> dict[str, float]:
    tokenizer, counts = model.tokenizer, {"colour": [0, 0], "kind": [0, 0]}
    model.eval()
    with torch.no_grad():
        for batch in batches:
            current["names"] = region_names(tokenizer, batch)
            embeds = model.build_inputs_embeds(batch["input_ids"], batch["images_clip"], batch["offset"],
                                               batch["region_boxes_xyxy_clip_norm"])
            hidden = model.causal_lm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                           use_cache=False).last_hidden_state
            predicted = model.causal_lm.lm_head(hidden).argmax(-1)
            for word, vocabulary in (("colour", COLOURS), ("kind", KINDS)):
                for row, labels in enumerate(batch["labels"]):
                    for t in word_positions(tokenizer, labels, vocabulary):
                        counts[word][0] += int(predicted[row, t - 1] == labels[t])
                        counts[word][1] += 1
    model.train()
    return {word: round(right / max(total, 1), 3) for word, (right, total) in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("real", "oracle"))
    parser.add_argument("--export", default="outputs/tiny_stage1/export")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg, model = trained_export.load(argparse.Namespace(export=args.export, set=args.set))
    model.train()
    apply_trainable_policy(model, train_clip=True)
    current: dict = {}
    if args.mode == "oracle":
        use_oracle_regions(model, current)
    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(LR_SCALE.get(parameter_group(name), 1.0), []).append(param)
    optimizer = torch.optim.AdamW([{"params": p, "lr": LR * s} for s, p in groups.items()], weight_decay=0.0)
    stream = trained_export.stream(cfg, model, "referring")
    held = [next(stream) for _ in range(8)]
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = next(stream)
        current["names"] = region_names(model.tokenizer, batch)
        loss = model(**{k: v for k, v in batch.items() if k in FORWARD_KEYS})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 100 == 0:
            print(json.dumps({"mode": args.mode, "export": args.export, "set": args.set, "step": step,
                              "loss": round(loss.item(), 3), **word_accuracy(model, held, current),
                              "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
