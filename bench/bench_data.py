#!/usr/bin/env python
"""Data-pipeline throughput: samples/s of one worker (one CPU core) for each stream.

    OMP_NUM_THREADS=1 python bench/bench_data.py [--samples 200] [--config 13b_stage2]

Writes a synthetic corpus with COCO/VG-like image sizes (640x480, 480x640, 800x600, 500x375) to a
temporary folder and draws from each stream's mixture with the preset's image sizes (13b: CLIP 224,
DINO 512), timing build + image load + transforms + tokenisation + collate in the calling process (the
work one DataLoader worker does). Tokenizer: the LLaMA-2 tokenizer when --tokenizer names a local
folder, else the tiny SentencePiece tokenizer (same kind of model, smaller vocabulary).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from chatterbox.config import load_config  # noqa: E402
from chatterbox.data.streams import build_stream  # noqa: E402
from chatterbox.data.synthetic import write_corpus  # noqa: E402

BENCH_IMAGE_SIZES = [(640, 480), (480, 640), (800, 600), (500, 375)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="13b_stage2", help="preset whose data image sizes are used")
    parser.add_argument("--samples", type=int, default=200, help="samples timed per stream")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--tokenizer", default="", help="local LLaMA tokenizer folder (default: tiny tokenizer)")
    parser.add_argument("--streams", default="grounding,referring,vqa")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from chatterbox.tokens import load_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            from chatterbox.tiny_tokenizer import build_tiny_tokenizer
            tokenizer = load_tokenizer(str(build_tiny_tokenizer(Path(tmp) / "tok")))
        corpus = write_corpus(Path(tmp) / "data", num_images=48, seed=0, image_sizes=BENCH_IMAGE_SIZES)
        cfg = load_config(args.config)
        for key, value in corpus.data_paths().items():
            setattr(cfg.data.paths, key, value)
        print(f"config {args.config}: clip {cfg.data.clip_image_size}px, dino {cfg.data.dino_image_size}px, "
              f"max_length {cfg.data.max_length}, tokenizer {type(tokenizer).__name__} ({len(tokenizer)} tokens), "
              f"torch threads {torch.get_num_threads()}")
        for task in args.streams.split(","):
            stream = build_stream(cfg.data, task, tokenizer, args.batch_size, seed=0, num_workers=0)
            next(stream)  # warm-up: file caches, lazy imports
            n_batches = max(1, args.samples // args.batch_size)
            start = time.perf_counter()
            for _ in range(n_batches):
                next(stream)
            elapsed = time.perf_counter() - start
            n = n_batches * args.batch_size
            print(f"{task:10s} {n / elapsed:7.1f} samples/s per worker ({n} samples, {elapsed:.2f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
