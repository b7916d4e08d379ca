#!/usr/bin/env python
"""Can the vision branch ground by both words when the query carries both? An oracle query test.

From an export, every "Where is the <colour> <kind>? [VG]" query of the grounding stream is replaced by an
oracle: a learned embedding of its colour plus one of its kind (6 + 3 vectors, nothing else trainable; the
vision branch and everything else frozen). After ``--steps`` steps on the stream (AdamW), the best box of each
such question on fresh batches is scored (IoU >= 0.5) beside the export's own query on the same questions (with
``--vision-lr`` the vision branch trains beside the oracle, so "own query" then meets a changed branch), split
by what decides the answer within the sample's other questions about the same image: another shape of the same
kind (the colour decides) or of the same colour (the kind decides). Training scenes: nine vectors cannot
memorise them.

    python docs/results/tiny_recipe/query_path/oracle_query.py EXPORT_DIR|init [--steps 300] [--batches 30]
        [--vision-lr 1e-3] [--save OUT_EXPORT]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trained_export  # noqa: E402

from chatterbox.boxes import cxcywh_to_xyxy  # noqa: E402
from chatterbox.data.synthetic import KINDS  # noqa: E402
from chatterbox.eval.grounding_metrics import iou_per_item  # noqa: E402
from chatterbox.train.query_warmup import COLOUR_NAMES as COLOURS, NAMED  # noqa: E402  (the corpus's names)


def named_queries(model, batch) -> list[tuple[int, int, str, str] | None]:
    """Per [VG] of the batch, in order: (row, index among the batch's queries, colour, kind) or None."""
    out, index = [], 0
    for row in range(batch["input_ids"].shape[0]):
        text = model.tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist())
        for before_vg in text.split("[VG]")[:-1]:
            named = NAMED.search(before_vg)
            ok = named and named.group(1) in COLOURS and named.group(2) in KINDS
            out.append((row, index, named.group(1), named.group(2)) if ok else None)
            index += 1
    return out


def main() -> None:
    def own_options(parser):
        parser.add_argument("--steps", type=int, default=300)
        parser.add_argument("--vision-lr", type=float, default=0.0, help="0: the vision branch frozen")
        parser.add_argument("--save", default="", help="write the model as an export here afterwards")

    args = trained_export.parse_args(__doc__, batches=30, add_arguments=own_options)
    steps, vision_lr, save = args.steps, args.vision_lr, args.save
    cfg, model = trained_export.load(args)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    width = model.query_head(torch.zeros(1, model.causal_lm.config.hidden_size)).shape[-1]
    colour_emb = torch.nn.Parameter(0.1 * torch.randn(len(COLOURS), width))
    kind_emb = torch.nn.Parameter(0.1 * torch.randn(len(KINDS), width))
    state = {"oracle": False, "named": [], "queries": None}

    def replace(module, inputs, output):
        state["queries"] = output.detach()
        if not state["oracle"]:
            return output
        output = output.clone()
        for item in state["named"]:
            if item is not None:
                _, q, colour, kind = item
                output[q] = colour_emb[COLOURS.index(colour)] + kind_emb[KINDS.index(kind)]
        return output

    model.query_head.register_forward_hook(replace)
    captured = {}
    original = model.vision_branch.forward_enc_dec

    def capture(*a, **k):
        captured["outputs"] = out = original(*a, **k)
        return out

    model.vision_branch.forward_enc_dec = capture
    stream = trained_export.stream(cfg, model, "grounding")
    groups = [{"params": [colour_emb, kind_emb], "lr": 1e-2}]
    if vision_lr:  # the vision branch learns with the oracle (a stand-in for a pretrained detector)
        vision = [p for p in model.vision_branch.parameters()]
        for p in vision:
            p.requires_grad_(True)
        groups.append({"params": vision, "lr": vision_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    model.eval()
    for step in range(1, steps + 1):
        batch = next(stream)
        state["named"], state["oracle"] = named_queries(model, batch), True
        loss = model(**{k: v for k, v in batch.items() if k != "sample_ids"})["grounding_loss"]
        if not loss.requires_grad:  # no named question in this batch
            continue
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(json.dumps({"step": step, "grounding_loss": round(loss.item(), 3)}), flush=True)

    counts = {}
    for _ in range(args.batches):
        batch = next(stream)
        named = named_queries(model, batch)
        targets = [t for row in batch["grounding_targets_cxcywh_norm"] for t in row]
        hits = {}
        for oracle in (False, True):
            state["named"], state["oracle"] = named, oracle
            with torch.no_grad():
                model(**{k: v for k, v in batch.items() if k != "sample_ids"})
            outputs = captured["outputs"]
            best = outputs["pred_logits"].max(-1).values.argmax(-1)  # [Q]
            boxes = outputs["pred_boxes"][torch.arange(len(best)), best]
            hits[oracle] = [bool(iou_per_item(cxcywh_to_xyxy(boxes[q][None]), cxcywh_to_xyxy(targets[q][:1]))[0] >= 0.5)
                            for q in range(len(best))]
        for item in named:
            if item is None:
                continue
            row, q, colour, kind = item
            others = [o for o in named if o is not None and o[0] == row and o[1] != q]
            decides = ("colour_decides" if any(o[3] == kind for o in others) else
                       "kind_decides" if any(o[2] == colour for o in others) else "either")
            for key in (decides, "all"):
                c = counts.setdefault(key, {"questions": 0, "own_query": 0, "oracle_query": 0})
                c["questions"] += 1
                c["own_query"] += hits[False][q]
                c["oracle_query"] += hits[True][q]
    result = {"export": args.export, "steps": steps, "vision_lr": vision_lr}
    for key, c in counts.items():
        result[key] = {"questions": c["questions"], "own_query": round(c["own_query"] / c["questions"], 3),
                       "oracle_query": round(c["oracle_query"] / c["questions"], 3)}
    print(json.dumps(result))
    if save:  # the model with its trained vision branch, as an export a stage can start from (train.init_from)
        model.vision_branch.forward_enc_dec = original
        model.save_pretrained(save)
        print("saved", save)


if __name__ == "__main__":
    main()
