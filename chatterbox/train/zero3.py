"""Whole weights of a ZeRO-3 model, for an export.

ZeRO-3 partitions every parameter across the data-parallel ranks and gathers a module's parameters only
while that module runs, so between steps each rank holds a slice of each. :func:`full_weights` gathers a
running model's, one module at a time, onto the host of the main rank; :func:`checkpoint_weights` puts
a checkpoint's slices together (scripts/export.py).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch


@contextlib.contextmanager
def full_weights(engine, model: torch.nn.Module, is_main: bool):
    """Inside the block, on the main rank, ``model``'s parameters hold their full values (on the host);
    afterwards their partitions again. Every rank must enter it (the gathering is collective)."""
    consolidated = engine._zero3_consolidated_16bit_state_dict()  # rank 0: full tensors on the host
    if not is_main:
        yield
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    lent = {}
    for name, value in consolidated.items():
        param = params.get(name)
        if param is not None and id(param) not in lent:
            lent[id(param)] = (param, param.data)
            param.data = value
    try:
        yield
    finally:
        for param, partition in lent.values():
            param.data = partition


def checkpoint_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable parameters of a ZeRO-3 checkpoint, whole (fp32 master values), by parameter name.

    ZeRO-3 cuts each parameter into ``ceil(numel / world_size)``-element slices (zero padding at the end),
    one per rank, and each rank's optimizer file holds its slices of every parameter in order (one flat
    vector per parameter group); the model-states file names the parameters and their shapes."""
    from chatterbox.train.checkpoint import CheckpointError, load_checkpoint_file
    from chatterbox.train.reshard import optimizer_files

    optim_files = optimizer_files(checkpoint_dir)
    world = len(optim_files)
    states = [checkpoint_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    missing = [p.name for p in states if not p.is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: ZeRO-3 model-states files missing ({missing})")
    model_states = load_checkpoint_file(states[0])
    flats = []
    for path in optim_files:
        optim = load_checkpoint_file(path)["optimizer_state_dict"]
        if optim.get("zero_stage") != 3 or "fp32_flat_groups" not in optim:
            raise CheckpointError(f"{path}: not a ZeRO-3 optimizer file")
        flats.append(torch.cat([g.float() for g in optim["fp32_flat_groups"]]))
    weights, offset = {}, 0
    for group in model_states["param_shapes"]:
        for name, shape in group.items():
            numel = math.prod(shape)
            part = -(-numel // world)
            if offset + part > flats[0].numel():
                raise CheckpointError(f"{checkpoint_dir}: the optimizer files end before {name}")
            weights[name] = torch.cat([flat[offset:offset + part] for flat in flats])[:numel].view(shape)
            offset += part
    for alias, source in model_states.get("shared_params", {}).items():
        weights[alias] = weights[source]
    return weights
