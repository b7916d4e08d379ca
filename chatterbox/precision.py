"""The floating-point type that coordinates, position encodings, losses and matching costs are computed in."""
from __future__ import annotations

import torch

__all__ = ["at_least_float32"]


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16 (and bool/integer) inputs, ``dtype`` itself when wider: a bf16 coordinate has ~3
    significant digits, and a float64 model must stay float64 throughout."""
    return torch.promote_types(dtype, torch.float32)
