#!/usr/bin/env python
"""The tiny LLM pretrained as a language model on the corpus's dialogue text, written as a LLaVA folder.

A stand-in for what upstream starts from (a pretrained LLaVA/Vicuna): the dialogues of every file of the
quickstart's corpus (data/synthetic; training scenes only), rendered with the vicuna_v1.1 template, `<image>`
and the box groups removed, next-token loss on every token. The folder loads as ``model.language.llm_path``
(its tokenizer is the tiny tokenizer with ChatterBox's tokens, so no rows are added).

    python docs/results/tiny_recipe/seeds/pretrain_language_model.py --out outputs/tiny_llm --steps 600
    bash docs/results/tiny_recipe/seeds/stage1_only.sh pretrained_llm_seed0 0 --set model.language.llm_path=outputs/tiny_llm
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from chatterbox.config import load_config
from chatterbox.conversation import ASSISTANT, USER, Message, render
from chatterbox.data.annotations import strip_box_groups
from chatterbox.model.llava_llama import LlavaLlamaForCausalLM, llama_config
from chatterbox.model.weights import build_tokenizer


def corpus_dialogues(root: Path) -> list[list[Message]]:
    files = sorted(root.glob("CB-*/*.json")) + [root / "llava_instruct_150k.json"]
    dialogues = []
    for path in files:
        data = json.loads(path.read_text())
        for item in data["data"] if isinstance(data, dict) else data:
            turns = item.get("conversation") or item["conversations"]
            dialogues.append([Message(USER if t["from"] == "human" else ASSISTANT,
                                      strip_box_groups(t["value"].replace("<image>", "")).strip()) for t in turns])
    return dialogues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default="data/synthetic")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg = load_config("tiny_stage1").model
    tokenizer = build_tokenizer(cfg)
    lm = LlavaLlamaForCausalLM(llama_config(cfg.language, mm_hidden_size=cfg.clip.hidden_size, vocab_size=len(tokenizer)))
    sequences = [tokenizer(render(d).text)["input_ids"] for d in corpus_dialogues(Path(args.data))]
    print(f"{len(sequences)} dialogues, {sum(map(len, sequences)) / len(sequences):.1f} tokens each", flush=True)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng, started = random.Random(args.seed), time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:  # 20 warm-up steps, then cosine to zero
            group["lr"] = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        batch = rng.sample(sequences, args.batch)
        width = max(map(len, batch))
        ids = torch.zeros(args.batch, width, dtype=torch.long)
        labels = torch.full((args.batch, width), -100)
        mask = torch.zeros(args.batch, width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = labels[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    lm.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
