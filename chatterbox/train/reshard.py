"""Resume a ZeRO-1/2 checkpoint on a different number of data-parallel ranks.

DeepSpeed refuses to load ZeRO optimizer states saved with another data-parallel world size. ZeRO-1/2
only partitions the optimizer: each parameter group is one flat fp32 vector (parameters in a fixed
order, zero padding at the end) cut into equal slices, one per rank. So the states of all old ranks,
concatenated and stripped of padding, form a world-size-independent vector; each new rank takes its
slice of it. We restore the fp32 master weights and Adam's moments that way, the module weights and LR
schedule from the model-states file, and DeepSpeed's step counters.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from chatterbox.train.checkpoint import CheckpointError, load_checkpoint_file

#: DeepSpeed's per-rank ZeRO optimizer file; engines trained in bf16 prefix it with "bf16_".
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def optimizer_files(checkpoint_dir: Path) -> list[Path]:
    """The ZeRO optimizer files of ``checkpoint_dir`` in rank order (one per data-parallel rank that saved)."""
    found = {}
    for path in checkpoint_dir.iterdir():
        if m := _OPTIM_FILE.match(path.name):
            found.setdefault(m.group(1) or "", {})[int(m.group(2))] = path
    by_rank = next(iter(found.values())) if len(found) == 1 else {}
    if not by_rank or sorted(by_rank) != list(range(len(by_rank))):
        names = sorted(p.name for files in found.values() for p in files.values())
        raise CheckpointError(f"{checkpoint_dir}: ZeRO optimizer files missing or incomplete ({names or 'none'})")
    return [by_rank[r] for r in range(len(by_rank))]


def merged_optimizer_state(checkpoint_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Per parameter group: full (unpartitioned, unpadded) ``fp32``, ``exp_avg``, ``exp_avg_sq`` and ``step``."""
    shards = [load_checkpoint_file(path)["optimizer_state_dict"]
              for path in optimizer_files(checkpoint_dir)]
    for r, shard in enumerate(shards):
        if not isinstance(shard.get("base_optimizer_state"), dict) or shard["zero_stage"] > 2:
            raise CheckpointError(f"{checkpoint_dir}: rank {r} is not a ZeRO-1/2 checkpoint of a torch optimizer")
    groups = []
    for g in range(len(shards[0]["single_partition_of_fp32_groups"])):
        fp32 = torch.cat([s["single_partition_of_fp32_groups"][g].float() for s in shards])
        numel = fp32.numel()  # the saved fp32 partitions carry no padding
        merged = {"fp32": fp32}
        states = [s["base_optimizer_state"]["state"][g] for s in shards]
        for key in ("exp_avg", "exp_avg_sq"):
            merged[key] = torch.cat([st[key].float() for st in states])[:numel]
        merged["step"] = states[0]["step"]
        groups.append(merged)
    return groups


def _slice(full: torch.Tensor, rank: int, part: torch.Tensor) -> torch.Tensor:
    n = part.numel()
    padded = torch.zeros(n * (rank + 1), dtype=full.dtype)
    available = min(full.numel(), padded.numel())
    padded[:available] = full[:available]
    return padded[rank * n:(rank + 1) * n].to(device=part.device, dtype=part.dtype)


def load_resharded(engine, checkpoint_root: Path, tag: str, rank: int) -> None:
    """Load ``checkpoint_root/tag`` (saved with any data-parallel size) into ``engine`` (ZeRO-1/2)."""
    directory = checkpoint_root / tag
    merged = merged_optimizer_state(directory)
    load_path, _ = engine.load_checkpoint(str(checkpoint_root), tag=tag, load_module_strict=False,
                                          load_module_only=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the module weights of {directory}")
    states = load_checkpoint_file(directory / "mp_rank_00_model_states.pt")
    optimizer = engine.optimizer
    partitions = optimizer.single_partition_of_fp32_groups
    if len(partitions) != len(merged):
        raise CheckpointError(f"{directory}: {len(merged)} parameter groups saved, the optimizer has {len(partitions)}")
    for g, (part, saved) in enumerate(zip(partitions, merged)):
        expected = sum(p.numel() for p in optimizer.bit16_groups[g])
        if saved["fp32"].numel() != expected:
            raise CheckpointError(f"{directory}: group {g} holds {saved['fp32'].numel()} values, the model "
                                  f"{expected}: not the same trainable parameters")
        part.data.copy_(_slice(saved["fp32"], rank, part))
        # torch keeps Adam's step counter on the host, except for the fused/capturable kernels (GPU runs).
        group = optimizer.optimizer.param_groups[g]
        step_device = part.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
        optimizer.optimizer.state[part] = {
            "step": torch.as_tensor(saved["step"], dtype=torch.float32).clone().to(step_device),
            "exp_avg": _slice(saved["exp_avg"], rank, part).float(),
            "exp_avg_sq": _slice(saved["exp_avg_sq"], rank, part).float(),
        }
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
        # A scheduler's state does not include the optimizer's current LR: set it as the saved run had it.
        for group, lr in zip(optimizer.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = states["global_steps"]
    engine.global_samples = states["global_samples"]
    engine.skipped_steps = states["skipped_steps"]
