"""The region encoder: one LLM-width vector per `<bbox>` box (upstream's "spi_module", spec §1.3).

Four CLIP layers (shallow -> deep) become a feature pyramid (bilinear resize to 128/64/32/16 px for a
16x16 patch grid), are fused over several rounds that exchange channel slices between neighbouring
levels, and every box is pooled from every level with RoIAlign, then projected:

    fuse(levels) -> roi_align per level (14x14) -> conv3x3 per level -> sum -> ReLU -> flatten
      -> Linear(C*14*14 -> D) + box positional MLP(box) -> Linear(D -> LLM width)

torchvision's ``roi_align(aligned=True, sampling_ratio=2)`` computes exactly what mmcv's RoIAlign does
with its defaults (average pooling, aligned). Parameter names are ours; ``chatterbox.model.weights``
holds the table that maps upstream's ``spi_module.*`` keys onto them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from chatterbox.model.config import RegionEncoderConfig
from chatterbox.precision import at_least_float32


class ConvGroupNormReLU(nn.Module):
    """mmcv's ConvModule(3x3, GN, ReLU): conv without bias (the norm has one), kaiming(fan_out) init."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class MultiLevelFuse(nn.Module):
    """Coordinate channels, a 1x1 conv per level, then rounds of channel exchange between neighbours.

    In a round every level ℓ is rebuilt from its own first half of channels, the last quarter of level
    ℓ+1 and the third quarter of level ℓ-1 (both resized to ℓ's size; the pyramid ends reuse
    themselves), and one conv module shared by all levels of that round is applied.
    """

    def __init__(self, input_dims: int, embed_dims: int, num_levels: int, num_rounds: int, groups: int):
        super().__init__()
        if embed_dims % 4:
            raise ValueError(f"region encoder embed_dims={embed_dims} must be divisible by 4 (channel exchange)")
        if embed_dims % groups:
            raise ValueError(f"region encoder embed_dims={embed_dims} not divisible by {groups} GroupNorm groups")
        self.embed_dims = embed_dims
        self.num_levels = num_levels
        self.input_convs = nn.ModuleList(nn.Conv2d(input_dims + 2, embed_dims, 1) for _ in range(num_levels))
        self.rounds = nn.ModuleList(ConvGroupNormReLU(embed_dims, groups) for _ in range(num_rounds))

    @staticmethod
    def _with_coordinates(feature: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = feature.shape
        xs = torch.linspace(-1, 1, width, device=feature.device, dtype=feature.dtype)
        ys = torch.linspace(-1, 1, height, device=feature.device, dtype=feature.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([grid_x, grid_y]).unsqueeze(0).expand(batch, -1, -1, -1)
        return torch.cat([feature, coords], dim=1)

    def _exchange(self, levels: list[torch.Tensor], conv: nn.Module) -> list[torch.Tensor]:
        keep = self.embed_dims // 2
        quarter = self.embed_dims // 4
        fused = []
        for level, own in enumerate(levels):
            upper = levels[min(level + 1, self.num_levels - 1)][:, keep + quarter:]
            lower = levels[max(level - 1, 0)][:, keep:keep + quarter]
            size = own.shape[-2:]
            upper = F.interpolate(upper, size=size, mode="bilinear", align_corners=True)
            lower = F.interpolate(lower, size=size, mode="bilinear", align_corners=True)
            fused.append(conv(torch.cat([own[:, :keep], upper, lower], dim=1)))
        return fused

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        levels = [conv(self._with_coordinates(f)) for conv, f in zip(self.input_convs, levels)]
        for conv in self.rounds:
            levels = self._exchange(levels, conv)
        return levels


class RegionEncoder(nn.Module):
    def __init__(self, cfg: RegionEncoderConfig, clip_hidden_size: int, clip_image_size: int, output_dims: int):
        super().__init__()
        if len(cfg.level_sizes) != cfg.num_levels:
            raise ValueError(f"region_encoder.level_sizes {cfg.level_sizes} must have num_levels={cfg.num_levels} "
                             "entries")
        self.cfg = cfg
        self.clip_image_size = clip_image_size
        # Stride of each pyramid level w.r.t. the CLIP input pixels (224/128 = 1.75 ... 224/16 = 14).
        self.strides = [clip_image_size / size for size in cfg.level_sizes]
        c, d = cfg.embed_dims, cfg.roi_feature_dims
        self.fuse = MultiLevelFuse(clip_hidden_size, c, cfg.num_levels, cfg.num_fuse_rounds,
                                   cfg.fuse_group_norm_groups)
        self.level_convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(cfg.num_levels))
        for conv in self.level_convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.roi_projection = nn.Linear(c * cfg.roi_output_size ** 2, d)
        p = cfg.pos_embed_dims
        self.box_position_mlp = nn.Sequential(
            nn.Linear(4, p), nn.ReLU(), nn.LayerNorm(p), nn.Linear(p, d), nn.ReLU(), nn.LayerNorm(d)
        )
        self.output_projection = nn.Linear(d, output_dims)

    def feature_pyramid(self, level_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """CLIP patch tokens [I,N,C] per level (shallow -> deep) -> fused maps [I,C',s_l,s_l]."""
        if len(level_tokens) != self.cfg.num_levels:
            raise ValueError(f"region encoder expects {self.cfg.num_levels} CLIP layers, got {len(level_tokens)}")
        maps = []
        for tokens, size in zip(level_tokens, self.cfg.level_sizes):
            images, num_patches, channels = tokens.shape
            grid = int(round(num_patches ** 0.5))
            if grid * grid != num_patches:
                raise ValueError(f"region encoder: {num_patches} CLIP patches do not form a square grid")
            fmap = tokens.transpose(1, 2).reshape(images, channels, grid, grid)
            maps.append(F.interpolate(fmap, size=(size, size), mode="bilinear", align_corners=True))
        return self.fuse(maps)

    def forward(self, level_tokens: list[torch.Tensor], boxes_xyxy_norm: torch.Tensor,
                box_image_index: torch.Tensor) -> torch.Tensor:
        """One vector per box.

        level_tokens: CLIP patch tokens [I,N,C] per level; boxes_xyxy_norm [R,4] in [0,1] of the CLIP
        input image; box_image_index [R] long, the image each box belongs to. Returns [R, output_dims].
        """
        if boxes_xyxy_norm.dim() != 2 or boxes_xyxy_norm.shape[-1] != 4:
            raise ValueError(f"region boxes must be [R,4] xyxy normalised, got {tuple(boxes_xyxy_norm.shape)}")
        pyramid = self.feature_pyramid(level_tokens)
        dtype = self.output_projection.weight.dtype
        # RoIAlign in at least fp32: CPU kernels lack bf16 and the pooled values feed a 200k-wide linear layer.
        roi_dtype = at_least_float32(dtype)
        boxes_xyxy_abs = boxes_xyxy_norm.to(roi_dtype) * self.clip_image_size
        rois = torch.cat([box_image_index.to(boxes_xyxy_abs)[:, None], boxes_xyxy_abs], dim=1)
        pooled_sum = None
        for fmap, stride, conv in zip(pyramid, self.strides, self.level_convs):
            pooled = roi_align(fmap.to(roi_dtype), rois, output_size=self.cfg.roi_output_size,
                               spatial_scale=1.0 / stride, sampling_ratio=self.cfg.roi_sampling_ratio, aligned=True)
            level_out = conv(pooled.to(dtype))
            pooled_sum = level_out if pooled_sum is None else pooled_sum + level_out
        features = self.roi_projection(F.relu(pooled_sum).flatten(1))
        features = features + self.box_position_mlp(boxes_xyxy_norm.to(dtype))
        return self.output_projection(features)
