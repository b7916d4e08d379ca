"""Query warm-up: the random language model of the tiny preset learns which shape a question names.

Upstream's language model comes pretrained (LLaVA): at the position a `[VG]` query is read from, its state
already says what the question asks for. A randomly initialised one's does not, and stage 1's grounding
loss alone then teaches it one word of the two the synthetic questions need ("Where is the red circle?":
the colour or the kind, by seed), while the vision branch learns to use that word only
(docs/results/tiny_recipe/README.md, "A query warm-up"). So before stage 1 (``train.query_warmup_steps``),
the language side — LLM, CLIP, projector and query head; not the vision branch — trains for a few hundred
steps on the grounding stream to tell the colour and the kind of each "Where is the <colour> <kind>?"
question from its query, through two linear heads that are dropped afterwards. Not part of upstream's
recipe: it stands in for the pretraining the tiny preset's random LLM lacks.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F

from chatterbox.data.synthetic import COLOURS, KINDS
from chatterbox.tokens import VG_TOKEN

logger = logging.getLogger(__name__)
NAMED = re.compile(r"Where is the (\w+) (\w+)\? $")
COLOUR_NAMES = tuple(COLOURS)


def named_shapes(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, int] | None]:
    """Per `[VG]` of a batch, row by row in order: (colour index, kind index) of the shape its question names,
    or None where the question is not "Where is the <colour> <kind>?" with the corpus's words."""
    named = []
    for ids, mask in zip(input_ids, attention_mask):
        text = tokenizer.decode(ids[mask.bool()].tolist())
        for before in text.split(VG_TOKEN)[:-1]:
            match = NAMED.search(before)
            ok = match is not None and match.group(1) in COLOUR_NAMES and match.group(2) in KINDS
            named.append((COLOUR_NAMES.index(match.group(1)), KINDS.index(match.group(2))) if ok else None)
    return named


def warm_up_query(model, batches, steps: int, lr: float, device: torch.device, dtype: torch.dtype,
                  eval_batches: int = 5) -> dict:
    """Train ``model``'s language side for ``steps`` batches of the grounding stream ``batches`` (AdamW at
    ``lr``); returns the heads' accuracy on ``eval_batches`` further batches. The vision branch is left as
    it is; every parameter's ``requires_grad`` is restored afterwards."""
    from chatterbox.train.loop import move_batch

    width = model.query_head.mlp[-2].out_features
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(COLOUR_NAMES)),
                                 "kind": torch.nn.Linear(width, len(KINDS))}).to(device)
    was_trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    language_side = [p for name, p in model.named_parameters() if not name.startswith("vision_branch.")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in language_side:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(language_side + list(heads.parameters()), lr=lr, weight_decay=0.0)

    def queries_and_labels(tries: int = 20):
        for _ in range(tries):  # a small batch may hold only "Where is it?" / "Show me ..." questions
            batch = next(batches)
            named = named_shapes(model.tokenizer, batch["input_ids"], batch["attention_mask"])
            keep = [i for i, n in enumerate(named) if n is not None]
            if keep:
                break
        else:
            raise ValueError(f"train.query_warmup_steps: {tries} grounding batches in a row without a 'Where is the "
                             "<colour> <kind>?' question in the synthetic corpus's words (the warm-up needs that "
                             "corpus)")
        queries = model.grounding_queries(**move_batch(batch, device, dtype))[torch.tensor(keep, device=device)].float()
        labels = torch.tensor([named[i] for i in keep], device=device)
        return queries, labels[:, 0], labels[:, 1]

    mode = model.training
    model.train()
    try:
        for _ in range(steps):
            queries, colour, kind = queries_and_labels()
            loss = F.cross_entropy(heads["colour"](queries), colour) + F.cross_entropy(heads["kind"](queries), kind)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        hits, total = {"colour": 0, "kind": 0}, 0
        with torch.no_grad():
            for _ in range(eval_batches):
                queries, colour, kind = queries_and_labels()
                hits["colour"] += (heads["colour"](queries).argmax(1) == colour).sum().item()
                hits["kind"] += (heads["kind"](queries).argmax(1) == kind).sum().item()
                total += len(colour)
    finally:
        model.train(mode)
        for name, p in model.named_parameters():
            p.requires_grad_(was_trainable[name])
            p.grad = None
    result = {"steps": steps, "questions": total, **{f"{k}_accuracy": v / max(total, 1) for k, v in hits.items()}}
    logger.info("query warm-up: %d steps; on %d further questions the query tells the colour %.3f, the kind %.3f",
                steps, total, result["colour_accuracy"], result["kind_accuracy"])
    return result
