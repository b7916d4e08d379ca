"""Resumable training checkpoints, written atomically, keep-last-K, with a `latest` pointer.

Layout under ``<output_dir>/checkpoints/``:

    step_00000050/                       one complete checkpoint (appears only once fully written)
        mp_rank_00_model_states.pt       trainable parameters (frozen base weights are not duplicated)
        *_optim_states.pt                ZeRO optimizer shards, LR scheduler
        trainer_state_rank<r>.pt         step, data-sampler positions and RNG states of rank r
    latest                               the tag of the newest complete checkpoint

A checkpoint is written into a staging folder and renamed into place, then `latest` is replaced
atomically: a crash mid-write leaves the previous checkpoint and pointer intact.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from chatterbox.train.distributed import barrier

LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, output_dir: str | os.PathLike, keep_last: int, rank: int = 0):
        if keep_last < 1:
            raise ValueError(f"keep_last_checkpoints={keep_last} must be >= 1")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ queries
    def tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name))

    def latest(self) -> str | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not (self.root / tag).is_dir():
            raise CheckpointError(f"{pointer} names {tag!r}, which does not exist under {self.root}")
        return tag

    def resolve(self, resume: str) -> str | None:
        """``resume`` from the config: "" (none), "auto" (latest, if any) or a checkpoint directory/tag."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        tag = path.name if path.is_dir() else resume
        if not (self.root / tag).is_dir():
            raise CheckpointError(f"no checkpoint {resume!r} under {self.root}; have {self.tags()}")
        return tag

    # ------------------------------------------------------------------ save / load
    def save(self, engine, step: int, trainer_state: dict) -> Path:
        """Save engine + this rank's trainer state as ``step_<step>``; every rank must call it."""
        tag = step_tag(step)
        staging = self.root / f".staging-{tag}"
        if self.rank == 0 and staging.exists():
            shutil.rmtree(staging)
        barrier()
        engine.save_checkpoint(str(staging), tag=tag, exclude_frozen_parameters=True, save_latest=False)
        torch.save(trainer_state, staging / tag / f"trainer_state_rank{self.rank}.pt")
        barrier()
        final = self.root / tag
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / tag, final)
            shutil.rmtree(staging, ignore_errors=True)
            atomic_write_text(self.root / LATEST, tag)
            self._prune()
        barrier()
        return final

    def saved_world_size(self, tag: str) -> int:
        """Number of ranks that wrote ``tag`` (one trainer-state file each)."""
        ranks = sorted(int(p.stem.rsplit("rank", 1)[1]) for p in (self.root / tag).glob("trainer_state_rank*.pt"))
        if not ranks or ranks != list(range(len(ranks))):
            raise CheckpointError(f"{self.root / tag}: trainer_state_rank*.pt files missing or incomplete ({ranks})")
        return len(ranks)

    def trainer_state(self, tag: str, rank: int) -> dict:
        state_file = self.root / tag / f"trainer_state_rank{rank}.pt"
        if not state_file.is_file():
            raise CheckpointError(f"{self.root / tag} has no {state_file.name}: incomplete checkpoint")
        return torch.load(state_file, weights_only=False)

    def load(self, engine, tag: str) -> dict:
        """Restore engine state from ``tag`` (saved with this world size); return this rank's trainer state."""
        path = self.root / tag
        state_file = path / f"trainer_state_rank{self.rank}.pt"
        if not state_file.is_file():
            raise CheckpointError(f"{path} has no {state_file.name}: incomplete, or saved with another world size")
        load_path, _ = engine.load_checkpoint(
            str(self.root), tag=tag, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        return torch.load(state_file, weights_only=False)

    def _prune(self) -> None:
        for tag in self.tags()[: -self.keep_last]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
