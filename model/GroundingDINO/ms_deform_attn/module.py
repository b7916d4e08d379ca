"""MultiScaleDeformableAttention: the nn.Module used by GroundingDINO's encoder and decoder.

Parameter names (value_proj, sampling_offsets, attention_weights, output_proj) and their init follow
upstream so official checkpoints load unchanged. Residual connection and dropout belong to the caller.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .op import ms_deform_attn


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over L feature levels, batch-first.

    Each query samples ``num_points`` locations per head and level around its reference point and
    takes a softmax-weighted sum (softmax over levels x points) of the bilinearly sampled values.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MultiScaleDeformableAttention: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.head_dim = embed_dim // num_heads
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream's init: offsets start on a ring of head directions, uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        # Scale each direction so its larger coordinate is 1: the first point sits one cell away.
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C].
            value: [N, S, C], the flattened levels.
            reference_points: [N, Lq, L, 2] normalised (x, y), or [N, Lq, L, 4] normalised (cx, cy, w, h)
                boxes, in which case offsets are scaled by half the box size.
            spatial_shapes: [L, 2] int64 (H, W); level_start_index: [L] int64.
            value_padding_mask: [N, S] bool, True marks padding (those values are zeroed).
            query_pos: [N, Lq, C] added to the query before predicting offsets and weights.
        Returns:
            [N, Lq, C] after output_proj.
        """
        if query_pos is not None:
            query = query + query_pos
        n, num_queries, _ = query.shape
        _, num_values, _ = value.shape
        if spatial_shapes.shape[0] != self.num_levels:
            raise ValueError(
                f"MultiScaleDeformableAttention: spatial_shapes has {spatial_shapes.shape[0]} levels, "
                f"the module was built for {self.num_levels}"
            )
        if reference_points.shape[:3] != (n, num_queries, self.num_levels):
            raise ValueError(
                f"MultiScaleDeformableAttention: reference_points must be [N={n}, Lq={num_queries}, "
                f"L={self.num_levels}, 2 or 4], got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(n, num_values, self.num_heads, self.head_dim)

        offsets = self.sampling_offsets(query).view(
            n, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(n, num_queries, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(n, num_queries, self.num_heads, self.num_levels, self.num_points)

        if reference_points.shape[-1] == 2:
            # Offsets are in cells of each level: divide by (W, H).
            level_wh = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / level_wh[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"MultiScaleDeformableAttention: reference_points last dim must be 2 or 4, "
                f"got {reference_points.shape[-1]}"
            )

        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)
