#!/usr/bin/env python
"""Stage 1 (grounding mixture). See chatterbox/train/launch.py for the options."""
import sys

from chatterbox.train.launch import main

if __name__ == "__main__":
    sys.exit(main(stage=1))
