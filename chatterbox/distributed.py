"""Where a process runs and which part of the work it has: the device, the weights' dtype and the
process-group context that training (DeepSpeed launches, chatterbox.train.distributed), evaluation
(torchrun shards) and chat share."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DistContext:
    """This process's rank among ``world_size`` processes, its GPU index on the host and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def resolve_device(name: str) -> torch.device:
    """A config's or command line's device: "auto" is the GPU when there is one; asking for CUDA without a
    visible GPU is an error, not a silent fall-back."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but no CUDA GPU is visible")
    return device


#: Weights dtypes by their command-line name ("auto" picks one per device, see `resolve_dtype`).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on a GPU (the project's default), fp32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _leave_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def join_torchrun(device: torch.device) -> DistContext:
    """The context of a process ``torchrun`` started (WORLD_SIZE/RANK/LOCAL_RANK set): joins the group (NCCL
    on GPUs, gloo on the CPU) and takes GPU ``LOCAL_RANK``; a plain process is rank 0 of 1 on ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # A process that exits with its group alive can abort in the backend's threads ("terminate called
        # without an active exception"). No barrier here: after an error the other ranks may never arrive.
        atexit.register(_leave_process_group)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)
