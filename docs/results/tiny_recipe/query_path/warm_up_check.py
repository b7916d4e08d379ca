#!/usr/bin/env python
"""chatterbox.train.query_warmup on a fresh tiny model, outside a training run: how well does its query tell the
colour and the kind after N steps?

    python docs/results/tiny_recipe/query_path/warm_up_check.py STEPS [INIT_SEED] [LR]

The model is built after ``torch.manual_seed(INIT_SEED)`` (default 0, as language_side.py's ``init``); the
grounding stream is tiny_stage1's (train seed 42); the rate is stage 1's (2e-3) unless LR is given; 10 further
batches score the heads.
"""
import sys

import torch

from chatterbox.config import load_config
from chatterbox.data.streams import build_stream
from chatterbox.train.query_warmup import warm_up_query
from chatterbox.train.run import build_model

steps, init_seed = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
cfg = load_config("tiny_stage1", ["train.init_from="])
lr = float(sys.argv[3]) if len(sys.argv) > 3 else cfg.train.lr
torch.manual_seed(init_seed)
model = build_model(cfg)
batches = iter(build_stream(cfg.data, "grounding", model.tokenizer, seed=cfg.train.seed, batch_size=8))
print({"init_seed": init_seed, "lr": lr,
       **warm_up_query(model, batches, steps, lr, torch.device("cpu"), torch.float32, eval_batches=10)})
