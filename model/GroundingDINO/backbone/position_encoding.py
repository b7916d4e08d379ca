"""Sine position encoding of a feature map from its padding mask (GroundingDINO's "SineHW" variant).

Positions are the cumulative count of valid pixels along each axis, normalised to (0, 2*pi] by the
valid extent, so a padded image gets the same encoding over its valid area as the unpadded one.
Output: [B, 2*num_pos_feats, H, W] = concat(y features, x features), in float32 or the given wider type.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinePositionEncoding", "sine_frequencies"]


def sine_frequencies(num_feats: int, temperature: float, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """temperature ** (2*floor(i/2)/num_feats): one frequency per (sin, cos) pair."""
    index = torch.arange(num_feats, dtype=dtype, device=device)
    return temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """[..., F] angles -> [..., F]: sin of even slots and cos of odd slots, interleaved pairwise."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEncoding(nn.Module):
    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20.0, temperature_w: float = 20.0,
                 normalize: bool = True, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = scale

    def forward(self, padding_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """padding_mask [B,H,W] bool (True = padding) -> [B, 2*num_pos_feats, H, W] in ``dtype``
        (callers pass at least float32: the normalised positions need its precision)."""
        if padding_mask.dim() != 3 or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be a [B,H,W] bool tensor, got {padding_mask.dtype} "
                             f"{tuple(padding_mask.shape)}")
        valid = ~padding_mask
        y_pos = valid.cumsum(1, dtype=dtype)
        x_pos = valid.cumsum(2, dtype=dtype)
        if self.normalize:
            eps = 1e-6
            y_pos = y_pos / (y_pos[:, -1:, :] + eps) * self.scale
            x_pos = x_pos / (x_pos[:, :, -1:] + eps) * self.scale
        freq_x = sine_frequencies(self.num_pos_feats, self.temperature_w, padding_mask.device, dtype)
        freq_y = sine_frequencies(self.num_pos_feats, self.temperature_h, padding_mask.device, dtype)
        pos_x = _interleave_sin_cos(x_pos[..., None] / freq_x)
        pos_y = _interleave_sin_cos(y_pos[..., None] / freq_y)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)
