#!/usr/bin/env python
"""Does the LM loss push the region vectors of one kind one way? The kind's signal in their gradient.

For batches of a referring stream whose replies name one kind each (a corpus written with
``scripts/make_synthetic_data.py --kind-question-share 1``, CB_REF alone), takes the gradient of the LM loss
on every region vector and reports how far the per-kind mean gradients lie from the overall mean
("between") against the spread of the gradients around their kind's mean ("within"), and the cosine
between the kinds' mean directions.

    python docs/results/tiny_recipe/region_path/kind_gradient_spread.py EXPORT_DIR --set data.paths... \
        --set "data.referring_mixture={cb_ref: 1}"
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from kind_gradient import KINDS
from lm_readout import FORWARD_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402

from chatterbox.model.lora import apply_trainable_policy  # noqa: E402


def main() -> None:
    args = trained_export.parse_args(__doc__, batches=12)
    cfg, model = trained_export.load(args)
    model.train()
    apply_trainable_policy(model, train_clip=True)
    captured = {}
    built = model._region_vectors

    def keep_gradient(*inputs):
        vectors = built(*inputs)
        vectors.retain_grad()
        captured["vectors"] = vectors
        return vectors

    model._region_vectors = keep_gradient
    batches = trained_export.stream(cfg, model, "referring")
    gradients, kinds = [], []
    for _ in range(args.batches):
        batch = next(batches)
        model(**{k: v for k, v in batch.items() if k in FORWARD_KEYS})["lm_loss"].backward()
        for labels in batch["labels"]:
            reply = model.tokenizer.decode(labels[labels >= 0])
            kinds.append(KINDS.index(re.search(r"(circle|square|triangle)", reply).group(1)))
        gradients.append(captured["vectors"].grad.detach())
        model.zero_grad()
    g, y = torch.cat(gradients), torch.tensor(kinds)
    assert len(g) == len(y), "one region per sample expected"
    means = torch.stack([g[y == k].mean(0) for k in range(len(KINDS))])
    directions = torch.nn.functional.normalize(means - g.mean(0), dim=-1)
    print(json.dumps({"export": args.export, "regions": len(y), "gradient_norm": g.norm(dim=1).mean().item(),
                      "between": (means - g.mean(0)).norm(dim=1).mean().item(),
                      "within": (g - means[y]).norm(dim=1).mean().item(),
                      "kind_direction_cosines": (directions @ directions.T).tolist()}))


if __name__ == "__main__":
    main()
