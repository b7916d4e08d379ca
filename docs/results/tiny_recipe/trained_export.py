"""What the tiny-recipe diagnostics (query_path/, region_path/) share: an export directory (or ``init``, a
freshly built model) and ``--set`` overrides on the command line, the tiny stage-2 model with those weights,
and batches of one of its training streams over the quickstart's corpus (data/synthetic; run from the
repository root)."""
from __future__ import annotations

import argparse

import torch

from chatterbox.config import load_config
from chatterbox.model.weights import load_export_weights
from chatterbox.train.distributed import init_distributed
from chatterbox.train.run import build_model, build_streams


def parse_args(description: str, batches: int, add_arguments=None) -> argparse.Namespace:
    """The diagnostics' common options; ``add_arguments(parser)`` adds a script's own."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("export", help="a save_pretrained export directory, or init")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override matching the export (e.g. model.clip.patch_size=14)")
    parser.add_argument("--batches", type=int, default=batches)
    parser.add_argument("--config", default="tiny_stage2", help="the stage-2 config the export was trained with")
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args()


def load(args: argparse.Namespace):
    """(config, model in eval mode) for ``args.export`` (seed 0 for whatever it does not hold); the config
    is ``args.config`` (tiny_stage2 when absent) with ``args.set``, on its configured device."""
    torch.manual_seed(0)
    cfg = load_config(getattr(args, "config", "tiny_stage2"), ["train.init_from=", *args.set])
    model = build_model(cfg).eval()
    if args.export != "init":
        load_export_weights(model, args.export)
    return cfg, model


def stream(cfg, model, name: str):
    """An iterator over the batches of one training stream ("grounding", "referring", "vqa")."""
    return iter(build_streams(cfg, model.tokenizer, init_distributed("cpu"))[name])
