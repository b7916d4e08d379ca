"""Training worker: one process per GPU (started by the deepspeed launcher) or one CPU process.

    python -m chatterbox.train.run --config configs/tiny_stage1.yaml [--set key=value ...]

Builds the tokenizer and model from the config (stage 2 loads stage 1's export from `train.init_from`),
one data stream per configured stream, and trains; at the end rank 0 writes the `from_pretrained`
export to `<output_dir>/export`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from chatterbox.accel import accelerate_training
from chatterbox.config import ChatterBoxConfig, add_config_arguments, config_from_args
from chatterbox.distributed import DistContext
from chatterbox.train.distributed import barrier, gather_objects, init_distributed, shutdown_distributed

logger = logging.getLogger("chatterbox.train")
EXPORT_DIR = "export"


def seed_everything(seed: int, rank: int) -> None:
    # Rank-dependent so that dropout masks differ across data-parallel ranks.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def resolve_init_export(init_from: str) -> Path:
    """Stage 2's initialisation: an export directory, a training output directory holding one, or the Hub id
    of a repo holding an export."""
    from chatterbox.model import hub
    from chatterbox.model.weights import WeightsError

    remedy = "run stage 1 first or point init_from at its output directory"
    try:
        path = hub.resolve_folder(init_from, "train.init_from", hub.EXPORT_FILES)
    except WeightsError as e:
        raise WeightsError(f"{e}; {remedy}") from None
    for candidate in (path, path / EXPORT_DIR):
        if (candidate / "export.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"train.init_from={init_from!r}: no ChatterBox export there (expected export.json in it or in "
        f"{path / EXPORT_DIR}); {remedy}"
    )


@contextlib.contextmanager
def constructed_on(device: torch.device, dtype: torch.dtype):
    """New parameters are created on ``device`` in ``dtype`` (a random 7B/13B init on the host takes minutes and
    every rank's copy of it, in fp32, would need 28-52 GB of host memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cfg: ChatterBoxConfig, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """The model on ``device`` in ``dtype`` (default: where the constructors put it, on the host).

    A random language model (no `model.language.llm_path`) is constructed directly on an accelerator (or meta)
    ``device``; weights read from files are loaded on the host and then moved."""
    from chatterbox.model.chatterbox import ChatterBox
    from chatterbox.model.weights import build_tokenizer

    off_host = device is not None and device.type != "cpu"
    on_device = off_host and not cfg.model.language.llm_path
    construction = constructed_on(device, dtype or torch.get_default_dtype()) if on_device else contextlib.nullcontext()
    tokenizer = build_tokenizer(cfg.model)
    with construction:
        model = ChatterBox.build(cfg.model, tokenizer=tokenizer, verbose=False)
    if cfg.train.init_from:
        from chatterbox.model.weights import load_export_weights

        load_export_weights(model, resolve_init_export(cfg.train.init_from))
    if off_host:
        # Cast before moving: DeepSpeed casts to the training dtype anyway, and a 13B fp32 copy would not fit.
        model.to(dtype=dtype or next(model.parameters()).dtype).to(device)
    return model


def build_streams(cfg: ChatterBoxConfig, tokenizer, dist: DistContext) -> dict:
    from chatterbox.data.streams import build_stream

    return {
        name: build_stream(cfg.data, name, tokenizer, batch_size=stream.micro_batch_size,
                           seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size)
        for name, stream in cfg.train.streams.items()
    }


def train(cfg: ChatterBoxConfig, max_steps: int | None = None) -> dict:
    """Run (or resume) the configured stage; return a summary. Usable from Python and tests."""
    from chatterbox.train.checkpoint import output_dir_lock

    dist = init_distributed(cfg.device)
    # Held from before the model is built to after the summary is written: a second run into the same
    # output_dir stops at once instead of writing into this one's checkpoints.
    with output_dir_lock(cfg.train.output_dir, enabled=dist.is_main):
        return _train(cfg, dist, max_steps)


def data_report(streams: dict) -> dict:
    """Per stream, over all ranks: the distinct bad records skipped (skip-and-count) and the samples whose
    dialogues lost rounds to data.max_length. Logged as a warning when not zero."""
    report = {}
    for name, stream in streams.items():
        ranks = gather_objects(stream.report())
        skipped = sorted({r for rank in ranks for r in rank["skipped_record_ids"]})
        report[name] = {"skipped_records": len(skipped), "skipped_record_ids": skipped[:100],
                        "truncated_samples": sum(rank["truncated_samples"] for rank in ranks),
                        "rounds_dropped": sum(rank["rounds_dropped"] for rank in ranks)}
        if skipped or report[name]["truncated_samples"]:
            logger.warning("stream %s: %d bad records skipped (first: %s); %d samples lost %d rounds to "
                           "data.max_length", name, len(skipped), skipped[:3], report[name]["truncated_samples"],
                           report[name]["rounds_dropped"])
    return report


def _train(cfg: ChatterBoxConfig, dist: DistContext, max_steps: int | None) -> dict:
    from chatterbox.data.streams import build_stream
    from chatterbox.train.checkpoint import CheckpointManager
    from chatterbox.train.loop import PRECISION_DTYPES, Trainer
    from chatterbox.train.query_warmup import warm_up_query
    from chatterbox.train.zero3 import full_weights

    seed_everything(cfg.train.seed, dist.rank)
    model = build_model(cfg, dist.device, PRECISION_DTYPES[cfg.train.precision])
    warmup = None
    if cfg.train.query_warmup_steps and CheckpointManager(Path(cfg.train.output_dir), 1, dist.rank).resolve(
            cfg.train.resume) is None:
        # every rank warms up on rank 0's batches (and DeepSpeed starts every rank from rank 0's weights)
        batches = iter(build_stream(cfg.data, "grounding", model.tokenizer, seed=cfg.train.seed,
                                    batch_size=cfg.train.streams["grounding"].micro_batch_size))
        warmup = warm_up_query(model, batches, cfg.train.query_warmup_steps, cfg.train.query_warmup_lr, dist.device,
                               PRECISION_DTYPES[cfg.train.precision])
    accelerate_training(model, cfg.train, dist.device)
    if dist.is_main:
        print(model.parameter_table(), flush=True)
    streams = build_streams(cfg, model.tokenizer, dist)
    trainer = Trainer(cfg, dist, model, streams)
    history = trainer.fit(max_steps=max_steps)
    export = Path(cfg.train.output_dir) / EXPORT_DIR
    if trainer.step >= trainer.total_steps:
        # ZeRO-3: each rank holds a slice of every parameter; the main rank writes them whole
        zero3 = cfg.train.zero_stage == 3
        with full_weights(trainer.engine, model, dist.is_main) if zero3 else contextlib.nullcontext():
            if dist.is_main:
                model.save_pretrained(export)
        barrier()
    summary = {
        "stage": cfg.train.stage,
        "global_step": trainer.step,
        "output_dir": str(cfg.train.output_dir),
        "export": str(export) if export.exists() else None,
        "world_size": dist.world_size,
        # per rank: the most GPU memory the run's tensors held (the ZeRO settings' cost; None on a CPU)
        "gpu_memory_peak_gib": gather_objects(torch.cuda.max_memory_allocated(dist.device) / 2**30
                                              if dist.device.type == "cuda" else None),
        "query_warmup": warmup,
        "data": data_report(streams),
        "losses": [{"step": h.step, "lr": h.lr, "seconds": h.total_seconds,
                    "samples": h.samples * dist.world_size, **h.losses} for h in history],
    }
    if dist.is_main:
        (Path(cfg.train.output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="ChatterBox training worker")
    add_config_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many more global steps")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    train(cfg, max_steps=args.max_steps)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
