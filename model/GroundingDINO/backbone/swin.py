"""Swin Transformer backbone (Swin-T 224/1k, Swin-B 384/22k) with the module names of GroundingDINO's
checkpoints (``layers.N.blocks.N.attn.qkv``, ``layers.N.downsample.reduction``, ``normK`` per output).

Inputs of any size work: the patch embedding pads to a multiple of the patch size and every block pads
to a multiple of the window (upstream behaviour). Output: one [B, C_k, H_k, W_k] map per requested stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from timm.layers import DropPath, trunc_normal_
from torch import nn

__all__ = ["SwinTransformer"]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B,H,W,C] (H, W multiples of window) -> [B*nW, window*window, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of window_partition: [B*nW, window*window, C] -> [B,H,W,C]."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", relative[..., 0] * (2 * window - 1) + relative[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B*nW, N, C]; shift_mask [nW, N, N] additive (0 / -100) or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if shift_mask is not None:
            num_windows = shift_mask.shape[0]
            attn = attn.view(bw // num_windows, num_windows, self.num_heads, n, n) + shift_mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, shift_mask: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        pad_b, pad_r = (-h) % self.window, (-w) % self.window
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # padded tokens are zeros after the norm, as upstream
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(window_partition(x, self.window), shift_mask if self.shift else None)
        x = window_merge(x, self.window, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, h * w, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (C -> 4C), LayerNorm, linear 4C -> 2C; odd sizes are zero-padded."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 drop_paths: list[float], downsample: bool, use_checkpoint: bool):
        super().__init__()
        self.window, self.shift = window, window // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_paths[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def shifted_window_mask(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """[nW, N, N] additive mask that stops attention across the seams of the cyclic shift."""
        hp, wp = -(-h // self.window) * self.window, -(-w // self.window) * self.window
        region = torch.zeros((1, hp, wp, 1), device=device, dtype=dtype)  # small integer labels: exact
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        label = 0
        for hs in cuts:
            for ws in cuts:
                region[:, hs, ws, :] = label
                label += 1
        region = window_partition(region, self.window).squeeze(-1)
        different = region.unsqueeze(1) != region.unsqueeze(2)
        return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, -100.0)

    def forward(self, x: torch.Tensor, h: int, w: int):
        mask = self.shifted_window_mask(h, w, x.device, x.dtype)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
                x = torch_checkpoint.checkpoint(block, x, h, w, mask, use_reentrant=False)
            else:
                x = block(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (-w) % self.patch_size, 0, (-h) % self.patch_size))
        x = self.proj(images)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinTransformer(nn.Module):
    def __init__(self, embed_dim: int, depths: list[int], num_heads: list[int], window_size: int,
                 out_indices: list[int], patch_size: int = 4, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.2, use_checkpoint: bool = False):
        super().__init__()
        self.out_indices = list(out_indices)
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        # Stochastic depth grows linearly over all blocks of all stages.
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(SwinStage(self.num_features[i], depth, num_heads[i], window_size, mlp_ratio,
                                         rates[start:start + depth], downsample=i < len(depths) - 1,
                                         use_checkpoint=use_checkpoint))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B,3,H,W] -> [B, C_k, ceil(H/s_k), ceil(W/s_k)] for every stage k in out_indices."""
        x = self.patch_embed(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outputs = []
        for i, stage in enumerate(self.layers):
            stage_out, x, next_h, next_w = stage(x, h, w)
            if i in self.out_indices:
                normed = getattr(self, f"norm{i}")(stage_out)
                outputs.append(normed.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            h, w = next_h, next_w
        return outputs
