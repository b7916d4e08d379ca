"""Backbone + position encoding: images -> multi-level feature maps, padding masks and positions.

The module is an ``nn.Sequential`` of (Swin, position encoding) so that checkpoint keys read
``backbone.0.*`` exactly as in GroundingDINO's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.precision import at_least_float32

from .position_encoding import SinePositionEncoding
from .swin import SwinTransformer

__all__ = ["BackboneFeatures", "Joiner", "downsample_mask"]


@dataclass
class BackboneFeatures:
    """Output of the frozen part of the vision branch, for a batch of B images.

    feature_maps[k]: [B, C_k, H_k, W_k]; masks[k]: [B, H_k, W_k] bool (True = padding);
    positions[k]: [B, hidden_dim, H_k, W_k]; image_mask: [B, H, W] bool of the input pixels.
    """

    feature_maps: list[torch.Tensor]
    masks: list[torch.Tensor]
    positions: list[torch.Tensor]
    image_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.image_mask.shape[0]


def downsample_mask(image_mask: torch.Tensor, size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Nearest-neighbour resize of a [B,H,W] bool padding mask to ``size`` (upstream's rule), computed on
    0/1 values of ``dtype`` (exact in any float type)."""
    return F.interpolate(image_mask[None].to(dtype), size=tuple(size)).to(torch.bool)[0]


class Joiner(nn.Sequential):
    def __init__(self, swin: SwinTransformer, position_encoding: SinePositionEncoding):
        super().__init__(swin, position_encoding)

    @property
    def swin(self) -> SwinTransformer:
        return self[0]

    @property
    def position_encoding(self) -> SinePositionEncoding:
        return self[1]

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor) -> BackboneFeatures:
        maps = self.swin(images)
        dtype = at_least_float32(maps[0].dtype)
        masks = [downsample_mask(image_mask, m.shape[-2:], dtype) for m in maps]
        positions = [self.position_encoding(m, dtype).to(f.dtype) for m, f in zip(masks, maps)]
        return BackboneFeatures(maps, masks, positions, image_mask)
