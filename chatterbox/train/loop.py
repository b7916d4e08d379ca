"""One training recipe for both stages (spec/upstream.md §2.5), on one DeepSpeed engine.

Per global step, each stream of the stage whose cadence is due (stage 1: grounding every step; stage 2:
referring every 10th, grounding every step, VQA every 5th — in that order, as upstream) runs one full
gradient-accumulation cycle: micro-batches -> forward -> backward -> one optimizer step. The loss is
upstream's `lm_loss + grounding_loss`. Checkpoints every `save_every_steps` and at the end; resumes
exactly (model, optimizer, scheduler, data positions, RNG).
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chatterbox.config import ChatterBoxConfig, dump_config
from chatterbox.data.mixtures import STREAM_ORDER, streams_due
from chatterbox.train.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state
from chatterbox.distributed import DistContext
from chatterbox.train.engine import build_engine, use_stream
from chatterbox.train.reshard import load_resharded
from chatterbox.train.schedule import upstream_extra_steps
from chatterbox.train.tracking import Tracker

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOGGED_LOSSES = ("loss", "lm_loss", "grounding_loss")  # "loss" first: it is the one checked for finiteness


def stream_cadence(cfg: ChatterBoxConfig) -> dict[str, int]:
    return {name: stream.every_n_steps for name, stream in cfg.train.streams.items()}


def move_batch(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors (also inside lists) to ``device``; floating-point images to the training dtype.

    Box tensors stay float32: they are coordinates, not activations. ``offset`` (rows -> images) and
    ``grounding_targets_cxcywh_norm`` stay on the host, where the model reads them (the grounding step packs the
    targets into one transfer; reading device copies back would make the host wait for the forward).
    """

    def move(value, cast: bool):
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            return value.to(dtype) if cast and value.is_floating_point() else value
        if isinstance(value, (list, tuple)):
            return type(value)(move(v, cast) for v in value)
        return value

    on_host = ("offset", "grounding_targets_cxcywh_norm")
    return {k: v if k in on_host else move(v, cast=k.startswith("images")) for k, v in batch.items()}


@dataclass
class StepLog:
    step: int
    lr: float
    losses: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    data_seconds: float = 0.0
    total_seconds: float = 0.0


class Trainer:
    """Drives a model (returning `loss`, `lm_loss`, `grounding_loss`) over resumable data streams.

    ``streams`` maps a stream name to an iterator of batches with ``state_dict``/``load_state_dict``.
    """

    def __init__(self, cfg: ChatterBoxConfig, dist: DistContext, model: torch.nn.Module, streams: dict):
        self.cfg, self.dist = cfg, dist
        self.train_cfg = cfg.train
        self.streams = streams
        unknown = set(cfg.train.streams) - set(STREAM_ORDER)
        if unknown:
            raise ValueError(f"train.streams: unknown stream(s) {sorted(unknown)}; expected {list(STREAM_ORDER)}")
        missing = [s for s in cfg.train.streams if s not in streams]
        if missing:
            raise ValueError(f"train.streams names {missing} but no data stream was built for them")
        # before the engine is built: a tracking backend that is not installed is refused at once
        self.tracker = Tracker(cfg) if dist.is_main else None
        self.dtype = PRECISION_DTYPES[cfg.train.precision]
        self.engine, self.optimizer, self.scheduler = build_engine(model, cfg.train, dist.world_size)
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoints = CheckpointManager(self.output_dir, cfg.train.keep_last_checkpoints, dist.rank)
        self.total_steps = cfg.train.epochs * cfg.train.steps_per_epoch
        self.step = 0
        self.history: list[StepLog] = []

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "streams": {name: s.state_dict() for name, s in self.streams.items()},
            "rng": rng_state(),
        }

    def maybe_resume(self) -> bool:
        tag = self.checkpoints.resolve(self.train_cfg.resume)
        if tag is None:
            self.checkpoints.start_fresh(overwrite=self.train_cfg.overwrite_checkpoints)
            return False
        saved_world = self.checkpoints.saved_world_size(tag)
        reshard = saved_world != self.dist.world_size
        if reshard and self.checkpoints.trainer_state(tag, 0).get("zero_stage") == 3:
            raise CheckpointError(f"{self.checkpoints.root / tag} is a ZeRO-3 checkpoint of {saved_world} rank(s): "
                                  f"resume it on {saved_world}, not {self.dist.world_size} (only ZeRO-0/1/2 "
                                  "checkpoints are re-partitioned)")
        if reshard:
            # Another number of ranks: re-partition the ZeRO state; data continues after every draw the
            # old ranks made; per-rank RNG streams cannot carry over, so they are re-seeded.
            load_resharded(self.engine, self.checkpoints.root, tag, self.dist.rank)
            state = self.checkpoints.trainer_state(tag, rank=0)
        else:
            state = self.checkpoints.load(self.engine, tag)
        self.step = state["step"]
        for name, stream_state in state["streams"].items():
            self.streams[name].load_state_dict(stream_state, reshard=reshard)
        if reshard:
            seed = self.train_cfg.seed + self.step * self.dist.world_size + self.dist.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        else:
            set_rng_state(state["rng"])
        if self.dist.is_main:
            logger.info("resumed from %s at global step %d (saved by %d rank(s), now %d)",
                        self.checkpoints.root / tag, self.step, saved_world, self.dist.world_size)
        return True

    def save(self) -> Path:
        return self.checkpoints.save(self.engine, self.step, self.trainer_state())

    # ------------------------------------------------------------------ loop
    def _run_stream(self, name: str, log: StepLog) -> None:
        stream_cfg = self.train_cfg.streams[name]
        use_stream(self.engine, stream_cfg, self.dist.world_size)
        n = stream_cfg.gradient_accumulation_steps
        losses, samples = [], []
        for micro in range(n):
            t0 = time.perf_counter()
            batch = next(self.streams[name])
            log.data_seconds += time.perf_counter() - t0
            log.samples += int(batch["input_ids"].shape[0])
            log.tokens += int(batch["attention_mask"].sum())
            out = self.engine(**move_batch(batch, self.dist.device, self.dtype))
            self.engine.backward(out["loss"])
            # The loss values stay on the device until the cycle's last backward: reading each one would make
            # the host wait for every micro-step before it fetches and sends the next batch.
            # ... and the criterion's named terms (loss_ce, loss_xy_0, ...), logged as upstream logs them
            keys = LOGGED_LOSSES + tuple(key for key in out if key.startswith("loss_"))
            losses.append(torch.stack([out[key].detach().float() for key in keys]))
            samples.append(batch.get("sample_ids"))
            if micro == n - 1:  # before the optimizer step, which a non-finite loss must not reach
                values = torch.stack(losses).tolist()
                for i, row in enumerate(values):
                    if not math.isfinite(row[0]):
                        raise FloatingPointError(
                            f"non-finite loss {row[0]} on stream {name!r} at step {self.step} (micro-batch {i + 1} "
                            f"of {n}); samples {samples[i]}")
            self.engine.step()
        grounded = any(row[LOGGED_LOSSES.index("grounding_loss")] for row in values)
        for k, key in enumerate(keys if grounded else LOGGED_LOSSES):  # no zero terms for streams without [VG]
            log.losses[f"{name}/{key}"] = sum(row[k] for row in values) / n

    def train_step(self) -> StepLog:
        t0 = time.perf_counter()
        log = StepLog(step=self.step, lr=self.scheduler.get_last_lr()[0])
        self.engine.train()
        for name in streams_due(self.step, stream_cadence(self.cfg)):
            self._run_stream(name, log)
        if self.train_cfg.schedule_stepping == "upstream_double":
            for _ in range(upstream_extra_steps(self.step)):
                self.scheduler.step()
        log.total_seconds = time.perf_counter() - t0
        self.step += 1
        return log

    def fit(self, max_steps: int | None = None) -> list[StepLog]:
        """Train to the end of the schedule (or ``max_steps`` more global steps); checkpoint as configured,
        and where training stops, so that a run stopped by ``max_steps`` continues from there."""
        self.maybe_resume()
        if self.dist.is_main:  # after the resume checks: a refused run leaves the earlier run's config
            dump_config(self.cfg, self.output_dir / "config.yaml")
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        progress = self._progress(end)
        completed = False
        try:
            while self.step < end:
                log = self.train_step()
                self.history.append(log)
                self._log(log, progress)
                if self.step % self.train_cfg.save_every_steps == 0 or self.step == end:
                    self.save()
            completed = True
        finally:  # a run that fails still writes out its scalars so far, and its wandb run ends marked failed
            if progress is not None:
                progress.close()
            if self.tracker is not None:
                self.tracker.close(failed=not completed)
        return self.history

    # ------------------------------------------------------------------ logging
    def _progress(self, end: int):
        if not self.dist.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=end, initial=self.step, desc=f"stage {self.train_cfg.stage}", unit="step",
                    dynamic_ncols=True)

    def _log(self, log: StepLog, progress) -> None:
        if not self.dist.is_main:
            return
        total = sum(v for k, v in log.losses.items() if k.endswith("/loss"))
        scalars = {
            "train/loss": total,
            "train/lr": log.lr,
            # upstream's names: vg_losses = grounding loss, vqa_losses = LM loss (summed over the streams run)
            "train/vg_losses": sum(v for k, v in log.losses.items() if k.endswith("/grounding_loss")),
            "train/vqa_losses": sum(v for k, v in log.losses.items() if k.endswith("/lm_loss")),
            **{f"streams/{key}": value for key, value in log.losses.items()},
            "metrics/total_secs_per_batch": log.total_seconds,
            "metrics/data_secs_per_batch": log.data_seconds,
        }
        if log.total_seconds > 0:
            scalars["metrics/samples_per_sec"] = log.samples * self.dist.world_size / log.total_seconds
            scalars["metrics/tokens_per_sec"] = log.tokens * self.dist.world_size / log.total_seconds
        self.tracker.log_scalars(scalars, log.step)
        if progress is not None:
            progress.update(1)
            if self.step % max(1, self.train_cfg.print_every_steps) == 0:
                progress.set_postfix(loss=f"{total:.4f}", lr=f"{log.lr:.2e}", refresh=False)
