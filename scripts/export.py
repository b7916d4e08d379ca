#!/usr/bin/env python
"""Export a training checkpoint to the `ChatterBox.from_pretrained` format.

    python scripts/export.py --run outputs/13b_stage2 --out exports/chatterbox-13b [--merge-lora]
    python scripts/export.py --run outputs/13b_stage2 --checkpoint step_00001500 --out ...
    hf upload owner/chatterbox-13b exports/chatterbox-13b   # publish it as is (huggingface_hub's CLI)

The model is rebuilt from the run's resolved config.yaml (base weights from their configured paths),
the checkpoint's trainable weights are loaded (strictly: every trainable parameter must be present),
and the export is written with its config, tokenizer and model card in the Hub layout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from chatterbox.config import load_config
from chatterbox.train.checkpoint import CheckpointError, CheckpointManager, load_checkpoint_file
from chatterbox.train.run import build_model, seed_everything
from chatterbox.train.zero3 import checkpoint_weights


def load_checkpoint_into(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    module_file = checkpoint_dir / "mp_rank_00_model_states.pt"
    if module_file.is_file():
        state = load_checkpoint_file(module_file)["module"]
    elif (checkpoint_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():  # ZeRO-3: one slice per rank
        module_file = checkpoint_dir
        state = checkpoint_weights(checkpoint_dir)
    else:
        raise CheckpointError(f"{checkpoint_dir}: no mp_rank_00_model_states.pt (nor ZeRO-3's per-rank files)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = model.state_dict()
    missing = sorted(trainable - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{module_file} does not fit the model: missing {missing[:5]} "
                              f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training output directory (holds config.yaml, checkpoints/)")
    parser.add_argument("--checkpoint", default="auto", help='checkpoint tag or "auto" (the latest)')
    parser.add_argument("--out", required=True, help="export directory")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA into the LLM weights (full export)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file; more weights are split into shards with an index")
    args = parser.parse_args(argv)

    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    manager = CheckpointManager(run, keep_last=1)
    tag = manager.resolve(args.checkpoint)
    if tag is None:
        raise SystemExit(f"{run}: no checkpoint to export")
    # Frozen weights are not in the checkpoint: rebuild the model exactly as the training run did (its
    # seed for weights without a configured path, stage 1's export for stage 2).
    seed_everything(cfg.train.seed, rank=0)
    model = build_model(cfg)
    load_checkpoint_into(model, manager.root / tag)
    out = model.save_pretrained(args.out, merge_lora=args.merge_lora, max_shard_size=args.max_shard_size)
    print(f"exported {manager.root / tag} -> {out}" + (" (LoRA merged)" if args.merge_lora else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
