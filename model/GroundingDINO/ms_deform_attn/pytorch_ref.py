"""Pure-PyTorch multi-scale deformable attention (the reference path; used on CPU).

Semantics follow upstream's fallback: for every level, bilinear sampling with zero padding and
``align_corners=False`` on the grid ``2 * location - 1``, then a weighted sum over levels and points.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


WHERE = "model/GroundingDINO/ms_deform_attn"


def check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Raise a ValueError naming the offending argument when shapes, dtypes or devices do not line up.

    Reads only metadata, so it never synchronises with the GPU.
    """
    where = WHERE
    if value.dim() != 4:
        raise ValueError(f"{where}: value must be [N,S,M,D], got shape {tuple(value.shape)}")
    n, _, m, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"{where}: spatial_shapes must be [L,2] (H,W), got shape {tuple(spatial_shapes.shape)}")
    num_levels = spatial_shapes.shape[0]
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise ValueError(
            f"{where}: spatial_shapes and level_start_index must be int64, got "
            f"{spatial_shapes.dtype} and {level_start_index.dtype}"
        )
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"{where}: level_start_index must be [L]={num_levels}, got shape {tuple(level_start_index.shape)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"{where}: sampling_locations must be [N,Lq,M,L,P,2], got shape {tuple(sampling_locations.shape)}"
        )
    n_loc, num_queries, m_loc, l_loc, num_points, _ = sampling_locations.shape
    if (n_loc, m_loc, l_loc) != (n, m, num_levels):
        raise ValueError(
            f"{where}: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} / spatial_shapes L={num_levels} in N, M or L"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"{where}: attention_weights must be {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    for name, t in (("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating-point tensor, got {t.dtype}")
    if not (spatial_shapes.device == level_start_index.device == value.device
            == sampling_locations.device == attention_weights.device):
        raise ValueError(f"{where}: all inputs must be on one device")


def level_layout(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_value_tokens: int):
    """[(H, W, start), ...] read to the host, each level checked to fit inside the value tokens."""
    layout = []
    for level, ((h, w), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        if h <= 0 or w <= 0 or start < 0 or start + h * w > num_value_tokens:
            raise ValueError(
                f"{WHERE}: level {level} (H={h}, W={w}, start={start}) does not fit in value with "
                f"S={num_value_tokens} tokens"
            )
        layout.append((h, w, start))
    return layout


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [N,S,M,D], locations [N,Lq,M,L,P,2] (x,y in [0,1]), weights [N,Lq,M,L,P] -> [N,Lq,M*D].

    Computed in the promoted dtype of value and locations (so bf16 values with fp32 locations keep
    precise sampling positions); the result has value's dtype.
    """
    n, _, m, d = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value_c = value.to(compute_dtype)
    grids = 2 * sampling_locations.to(compute_dtype) - 1  # grid_sample wants [-1, 1]
    sampled_per_level = []
    for level, (h, w, start) in enumerate(level_layout(spatial_shapes, level_start_index, value.shape[1])):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_level = value_c[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_level = grids[:, :, :, level].transpose(1, 2).reshape(n * m, num_queries, num_points, 2)
        sampled_per_level.append(
            F.grid_sample(value_level, grid_level, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [N*M, D, Lq, P]
    sampled = torch.stack(sampled_per_level, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]
    weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(n * m, 1, num_queries, num_levels * num_points)
    output = (sampled * weights).sum(-1).view(n, m * d, num_queries)
    return output.transpose(1, 2).contiguous().to(value.dtype)
