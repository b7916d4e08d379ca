#!/usr/bin/env python
"""The training worker (chatterbox.train.run) on a GPU capped to a smaller card's memory.

    torchrun --nproc_per_node 8 bench/train_capped.py --card-gib 40 --config ... [--set ...] [--max-steps N]

``torch.cuda.set_per_process_memory_fraction`` limits what the caching allocator may hold to
``--card-gib`` of the card's memory (a 40 GB or 24 GB card emulated on an 80 GB one: past it, allocation
fails as it would there). The run's train_summary.json reports each rank's peak (gpu_memory_peak_gib).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--card-gib", type=float, required=True, help="memory of the emulated card, GiB")
    args, rest = parser.parse_known_args()
    device = int(os.environ.get("LOCAL_RANK", 0))
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if args.card_gib > total:
        raise SystemExit(f"--card-gib {args.card_gib} exceeds this card's {total:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(args.card_gib / total, device)
    from chatterbox.train.run import main as train_main

    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
