"""Resumable training checkpoints, written atomically, keep-last-K, with a `latest` pointer.

Layout under ``<output_dir>/checkpoints/``:

    step_00000050/                       one complete checkpoint (appears only once fully written)
        mp_rank_00_model_states.pt       trainable parameters (frozen base weights are not duplicated);
                                         ZeRO-3: zero_pp_rank_<r>_mp_rank_00_model_states.pt, one per rank
        *_optim_states.pt                ZeRO optimizer shards, LR scheduler (stage 0: in the model states)
        trainer_state_rank<r>.pt         step, data-sampler positions and RNG states of rank r
    latest                               the tag of the newest complete checkpoint

A checkpoint is written into a staging folder and renamed into place, then `latest` is replaced
atomically: a crash mid-write leaves the previous checkpoint and pointer intact. Nothing a run did not
write is deleted: a fresh run refuses an output dir that holds checkpoints (unless told to move them
aside), keep-last-K never prunes checkpoints newer than the one just written, and one run at a time
holds the output dir (`output_dir_lock`).

Every file of a checkpoint is read with `load_checkpoint_file`: tensors and plain containers, plus the
few DeepSpeed classes its optimizer files hold, never arbitrary pickled objects (a checkpoint from
elsewhere cannot run code), and a file that cannot be read is named.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from chatterbox.train.distributed import barrier

logger = logging.getLogger(__name__)
LATEST = "latest"
LOCK_FILE = ".lock"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int:
    """Inverse of `step_tag`."""
    return int(_TAG.match(tag).group(1))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _deepspeed_checkpoint_classes() -> list:
    """The classes (not functions) DeepSpeed's ZeRO-1/2 optimizer files pickle: a loss scaler, the enum of the
    ZeRO stage, the fragment addresses of the flat partitions. Their unpickling only sets attributes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path: str | os.PathLike, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` (plus DeepSpeed's optimizer-file classes); a file that is not
    such a checkpoint (truncated, corrupt, or carrying other objects) is a CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
        raise CheckpointError(f"{path}: refused to load ({reason}); only tensors, plain containers and "
                              f"DeepSpeed's optimizer state are read from checkpoints") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({str(e).splitlines()[0]})") from None


def read_only_safe_checkpoint_files(engine) -> None:
    """Make ``engine`` (DeepSpeed) read its checkpoint files through `load_checkpoint_file`."""
    engine.checkpoint_engine.load = load_checkpoint_file


def rng_state() -> dict:
    # numpy's key array as a list: the state file then holds no numpy object (it is read weights-only)
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True):
    """Hold an exclusive lock on ``output_dir`` (created if missing) while the block runs.

    A second run into the same folder stops at once, naming the holder, instead of interleaving its
    checkpoints with the first's. The lock is the kernel's (flock): it goes with the process, SIGKILL
    included. Only one process per run takes it (rank 0)."""
    if not enabled:
        yield
        return
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise CheckpointError(f"{path} is in use by another training run (pid {holder}, lock file {lock}); "
                                  f"wait for it to end or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


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
            return self.newest_usable()
        path = Path(resume)
        tag = path.name if path.is_dir() else resume
        if not (self.root / tag).is_dir():
            raise CheckpointError(f"no checkpoint {resume!r} under {self.root}; have {self.tags()}")
        self.verify(tag)
        return tag

    def verify(self, tag: str) -> None:
        """A CheckpointError naming what makes ``tag`` unusable: a missing part, or a file that is not a
        complete torch archive (truncated or overwritten). Cheap: reads each file's zip directory only (and a
        trainer state where no optimizer file is present: a ZeRO stage-0 checkpoint needs none)."""
        path = self.root / tag
        if not path.is_dir():
            raise CheckpointError(f"{path} does not exist")
        names = sorted(p.name for p in path.glob("*.pt"))
        # ZeRO-3 writes each rank's slice of the module (zero_pp_rank_<r>_mp_rank_00_model_states.pt)
        model_states = any(n == "mp_rank_00_model_states.pt" or n.endswith("_mp_rank_00_model_states.pt")
                           for n in names)
        for part, present in (("mp_rank_00_model_states.pt", model_states),
                              ("trainer_state_rank*.pt", any(n.startswith("trainer_state_rank") for n in names))):
            if not present:
                raise CheckpointError(f"{path} has no {part}: incomplete checkpoint")
        for name in names:
            try:
                with zipfile.ZipFile(path / name) as archive:
                    archive.namelist()
            except (zipfile.BadZipFile, OSError) as e:
                raise CheckpointError(f"{path / name}: truncated or corrupt ({e})") from None
        # ZeRO stage 0 keeps the optimizer state in the model-states file; stages 1-2 (and checkpoints from
        # before the stage was recorded) write it apart
        if (not any(n.endswith("optim_states.pt") for n in names)
                and self.trainer_state(tag, 0).get("zero_stage") != 0):
            raise CheckpointError(f"{path} has no *optim_states.pt: incomplete checkpoint")

    def newest_usable(self) -> str | None:
        """The checkpoint ``--resume auto`` continues from: the one ``latest`` names or, where that one is
        unusable (see `verify`), the newest older one that is, with a warning naming what was skipped.
        None if there are no checkpoints."""
        pointer = self.root / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else ""
        match = _TAG.match(named)
        problems = [] if match or not pointer.is_file() else [f"{pointer} holds {named!r}, not a checkpoint tag"]
        candidates = [t for t in self.tags() if not match or tag_step(t) <= tag_step(named)]
        if match and named not in candidates:
            problems.append(f"{self.root / named} does not exist")
        for tag in reversed(candidates):
            try:
                self.verify(tag)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if problems and self.rank == 0:
                logger.warning("resuming from %s, the newest usable checkpoint; skipped: %s", self.root / tag,
                               "; ".join(problems))
            return tag
        if problems:
            raise CheckpointError(f"no usable checkpoint under {self.root}: {'; '.join(problems)}")
        return None

    def start_fresh(self, overwrite: bool = False) -> None:
        """Check that a run starting from step 0 loses nothing: an earlier run's checkpoints here are an
        error, or, with ``overwrite``, moved aside to ``checkpoints.replaced-<time>/`` (never deleted).
        Every rank must call it."""
        existing = self.tags()
        if existing and not overwrite:
            raise CheckpointError(
                f"{self.root} holds checkpoints of an earlier run ({', '.join(existing)}): continue it with "
                f"--resume auto, or start over with --overwrite (moves them to checkpoints.replaced-<time>/)")
        if existing and self.rank == 0:
            aside = self.root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.root, aside)
            self.root.mkdir()
            print(f"moved the earlier run's checkpoints {existing} to {aside}", flush=True)
        barrier()

    # ------------------------------------------------------------------ save / load
    def save(self, engine, step: int, trainer_state: dict) -> Path:
        """Save engine + this rank's trainer state as ``step_<step>``; every rank must call it."""
        tag = step_tag(step)
        staging = self.root / f".staging-{tag}"
        if self.rank == 0 and staging.exists():
            shutil.rmtree(staging)
        barrier()
        engine.save_checkpoint(str(staging), tag=tag, exclude_frozen_parameters=True, save_latest=False)
        torch.save({**trainer_state, "zero_stage": engine.zero_optimization_stage()},
                   staging / tag / f"trainer_state_rank{self.rank}.pt")
        barrier()
        final = self.root / tag
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / tag, final)
            shutil.rmtree(staging, ignore_errors=True)
            atomic_write_text(self.root / LATEST, tag)
            self._prune(step)
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
        return load_checkpoint_file(state_file)

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
        return load_checkpoint_file(state_file)

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep_last`` checkpoints up to ``step``; newer ones (from before a resume at an
        older checkpoint) are another history, which only their owner may delete."""
        upto = [tag for tag in self.tags() if tag_step(tag) <= step]
        for tag in upto[: -self.keep_last]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
