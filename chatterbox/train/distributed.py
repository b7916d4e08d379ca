"""Process-group set-up for training: one process (CPU or GPU) or a `deepspeed`/`torchrun` launch."""
from __future__ import annotations

import os
import socket

import torch

from chatterbox.distributed import DistContext, resolve_device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_name: str = "auto") -> DistContext:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPUs, gloo on a CPU.

    A plain `python` process gets single-process defaults (otherwise DeepSpeed falls back to MPI
    discovery). On a CPU DeepSpeed's shared-memory all-reduce op is not built: it needs a C++ JIT
    build (about a minute) and only speeds up multi-process CPU runs, which use gloo here.
    """
    device = resolve_device(device_name)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def shutdown_distributed() -> None:
    """Leave the process group together: a rank exiting first makes the others' NCCL watchdogs report a dead
    store at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
