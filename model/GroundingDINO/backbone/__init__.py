"""Swin backbone, sine position encoding and their joiner."""
from .joiner import BackboneFeatures, Joiner, downsample_mask
from .position_encoding import SinePositionEncoding
from .swin import SwinTransformer

__all__ = ["BackboneFeatures", "Joiner", "downsample_mask", "SinePositionEncoding", "SwinTransformer"]
