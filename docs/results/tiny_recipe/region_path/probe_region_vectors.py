#!/usr/bin/env python
"""How much of a region's kind do an export's region vectors carry? A linear probe.

Collects the region encoder's output vector and the kind named in the reply for every region of 60
referring batches of the quickstart's corpus (data/synthetic), standardises the vectors, fits a linear
classifier (Adam, 500 full-batch steps) on the first 75% and reports its accuracy on the rest, beside the
share of the region encoder's pooled activations that are alive. ``init`` probes a freshly built model.

    python docs/results/tiny_recipe/region_path/probe_region_vectors.py EXPORT_DIR|init [--set KEY=VALUE ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from kind_supervision import kind_labels, region_vectors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402


def main() -> None:
    args = trained_export.parse_args(__doc__, batches=60)
    cfg, model = trained_export.load(args)
    alive = []
    model.region_encoder.roi_projection.register_forward_hook(
        lambda module, inputs, output: alive.append((inputs[0] > 0).float().mean().item()))
    batches = trained_export.stream(cfg, model, "referring")
    vectors, kinds = [], []
    with torch.no_grad():
        for _ in range(args.batches):
            batch = next(batches)
            labels, regions = kind_labels(model, batch)
            vectors.append(region_vectors(model, batch)[regions])
            kinds.append(labels)
    x, y = torch.cat(vectors).float(), torch.cat(kinds)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(0.75 * len(y))
    probe = torch.nn.Linear(x.shape[1], 3)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(500):
        loss = torch.nn.functional.cross_entropy(probe(x[:n]), y[:n])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        held_out = (probe(x[n:]).argmax(-1) == y[n:]).float().mean().item()
        fitted = (probe(x[:n]).argmax(-1) == y[:n]).float().mean().item()
    most_frequent = torch.bincount(y[n:], minlength=3).max().item() / (len(y) - n)
    print(json.dumps({"export": args.export, "set": args.set, "regions": len(y),
                      "held_out_kind_accuracy": round(held_out, 3), "fitted_kind_accuracy": round(fitted, 3),
                      "held_out_most_frequent_kind": round(most_frequent, 3),
                      "alive_share": round(sum(alive) / len(alive), 3)}))


if __name__ == "__main__":
    main()
