#!/usr/bin/env python
"""Does the language model's loss on the kind word reach the region vector, and does the reply look at it?

For referring batches of the quickstart's corpus (data/synthetic) and a trained export, splits the LM loss
into its colour-word and kind-word tokens and reports, for each: the loss, the norm of its gradient on the
region vectors (the `<bbox>` input embeddings) and on the image tokens (per token), and the attention the
position predicting that word pays to the `<bbox>` token (mean over heads, per layer).

    python docs/results/tiny_recipe/region_path/kind_gradient.py EXPORT_DIR [--set KEY=VALUE ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
KINDS = ("circle", "square", "triangle")


def word_positions(tokenizer, labels_row: torch.Tensor, words) -> list[int]:
    """Label positions whose token starts one of ``words`` (SentencePiece pieces begin with '▁')."""
    found = []
    for t in (labels_row >= 0).nonzero().flatten().tolist():
        piece = tokenizer.convert_ids_to_tokens(int(labels_row[t])).lstrip("▁").lower()
        if piece and any(w.startswith(piece) and len(piece) >= 2 for w in words):
            found.append(t)
    return found


def main() -> None:
    args = trained_export.parse_args(__doc__, batches=8)
    cfg, model = trained_export.load(args)
    model.causal_lm.config._attn_implementation = "eager"  # attention weights
    tok = model.tokenizer
    image_id = tok.convert_tokens_to_ids("<im_patch>")
    stats = {w: {"loss": [], "grad_region": [], "grad_image_token": [], "attention_to_bbox": []}
             for w in ("colour", "kind")}
    batches = trained_export.stream(cfg, model, "referring")
    for _ in range(args.batches):
        batch = next(batches)
        ids, labels = batch["input_ids"], batch["labels"]
        embeds = model.build_inputs_embeds(ids, batch["images_clip"], batch["offset"],
                                           batch["region_boxes_xyxy_clip_norm"])
        embeds = embeds.detach().requires_grad_(True)
        out = model.causal_lm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                    output_attentions=True, use_cache=False)
        logits = model.causal_lm.lm_head(out.last_hidden_state).float()
        for word, vocabulary in (("colour", COLOURS), ("kind", KINDS)):
            rows, targets = [], []
            for r in range(ids.shape[0]):
                for t in word_positions(tok, labels[r], vocabulary):
                    rows.append(r)
                    targets.append(t)
            if not rows:
                continue
            rows_t, targets_t = torch.tensor(rows), torch.tensor(targets)
            loss = F.cross_entropy(logits[rows_t, targets_t - 1], labels[rows_t, targets_t])
            (grad,) = torch.autograd.grad(loss, embeds, retain_graph=True)
            stats[word]["loss"].append(loss.item())
            stats[word]["grad_region"].append(grad[ids == model.token_ids.bbox].norm(dim=-1).mean().item())
            stats[word]["grad_image_token"].append(grad[ids == image_id].norm(dim=-1).mean().item())
            per_layer = []
            for attention in out.attentions:  # [B, heads, T, T]
                weights = []
                for r, t in zip(rows, targets):
                    bbox = (ids[r] == model.token_ids.bbox).nonzero().flatten()
                    weights.append(attention[r, :, t - 1, bbox].sum(-1).mean().item())
                per_layer.append(sum(weights) / len(weights))
            stats[word]["attention_to_bbox"].append(per_layer)
    result = {"export": args.export, "batches": args.batches}
    for word, values in stats.items():
        result[word] = {k: (torch.tensor(v).mean(0).tolist() if v and isinstance(v[0], list)
                            else round(sum(v) / len(v), 6) if v else None) for k, v in values.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
