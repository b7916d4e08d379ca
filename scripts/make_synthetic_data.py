#!/usr/bin/env python
"""Write the synthetic corpus (every upstream data format, known boxes) used by the tiny preset and tests.

    python scripts/make_synthetic_data.py --out data/synthetic [--num-images 64] [--seed 0]

Prints the `data.paths` values to put in a config (also written to <out>/data_paths.yaml).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatterbox.data.synthetic import write_corpus  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic", help="output folder (created)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--eval-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind-question-share", type=float, default=0.0,
                        help="share of CB_REF rounds asking for the shape's kind alone (0: none, as upstream's data)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    corpus = write_corpus(args.out, args.num_images, args.seed, args.eval_fraction,
                          kind_question_share=args.kind_question_share)
    n_eval = sum(s.split == "eval" for s in corpus.scenes)
    print(f"wrote {len(corpus.scenes)} scenes ({n_eval} held out for eval) to {args.out} "
          f"in {time.perf_counter() - start:.2f}s")
    for key, value in corpus.data_paths().items():
        print(f"  data.paths.{key}={value}")
    print(f"an example of your own data (docs/data.md): data.paths.jsonl_files=[{corpus.jsonl_example}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
