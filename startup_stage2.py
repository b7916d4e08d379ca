#!/usr/bin/env python
"""Stage 2 (referring + grounding + VQA), initialised from stage 1's output (train.init_from)."""
import sys

from chatterbox.train.launch import main

if __name__ == "__main__":
    sys.exit(main(stage=2))
