"""Bidirectional image<->text attention (GroundingDINO's feature-fusion layer, ``BiAttentionBlock``).

Image tokens attend to text tokens and text tokens attend to image tokens with one shared set of
attention logits; each side is updated through a layer-scale (gamma, init 1e-4) residual on its
layer-normed input. In ChatterBox the "text" is the [VG] query embedding (one token per query).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

__all__ = ["BiMultiHeadAttention", "BiAttentionBlock"]


class BiMultiHeadAttention(nn.Module):
    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 logit_clamp: float = 50000.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        # Keeps fp16 logits finite (upstream's +-5e4 clamp).
        self.logit_clamp = logit_clamp
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for layer in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                      self.out_l_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        return x.view(n, s, self.num_heads, self.head_dim).transpose(1, 2)  # [N, H, S, d]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        n, _, s, _ = x.shape
        return x.transpose(1, 2).reshape(n, s, self.num_heads * self.head_dim)

    def forward(self, v: torch.Tensor, l: torch.Tensor, v_padding_mask: torch.Tensor | None = None,
                l_padding_mask: torch.Tensor | None = None):
        """v [N,Sv,Cv] image tokens, l [N,T,Cl] text tokens; masks True = padding. Returns (delta_v, delta_l)."""
        query = self._heads(self.v_proj(v) * self.scale)
        key = self._heads(self.l_proj(l))
        logits = query @ key.transpose(-1, -2)  # [N, H, Sv, T]
        # Shift by the per-sample maximum before clamping (upstream shifts by the batch maximum; per
        # sample keeps each query's result independent of what else is in the batch). The shifts are
        # detached: a softmax does not change under a shift along its dimension, so their gradient is zero
        # (up to rounding, while the clamp does not bite) and upstream's gradients are kept; amax's backward
        # (gradient split over ties) gave non-finite gradients in the bf16 step compiled by torch.compile.
        logits = logits - logits.detach().amax(dim=(1, 2, 3), keepdim=True)
        logits = logits.clamp(-self.logit_clamp, self.logit_clamp)
        logits_l = logits.transpose(-1, -2)
        logits_l = (logits_l - logits_l.detach().amax(dim=-1, keepdim=True)).clamp(-self.logit_clamp,
                                                                                   self.logit_clamp)
        if v_padding_mask is not None:
            logits_l = logits_l.masked_fill(v_padding_mask[:, None, None, :], float("-inf"))
        if l_padding_mask is not None:
            logits = logits.masked_fill(l_padding_mask[:, None, None, :], float("-inf"))
        attn_v = F.dropout(logits.softmax(dim=-1), p=self.dropout, training=self.training)
        attn_l = F.dropout(logits_l.softmax(dim=-1), p=self.dropout, training=self.training)
        delta_v = self.out_v_proj(self._merge(attn_v @ self._heads(self.values_l_proj(l))))
        delta_l = self.out_l_proj(self._merge(attn_l @ self._heads(self.values_v_proj(v))))
        return delta_v, delta_l


class BiAttentionBlock(nn.Module):
    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 drop_path: float = 0.0, init_values: float = 1e-4, logit_clamp: float = 50000.0):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout, logit_clamp)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_v = nn.Parameter(torch.full((v_dim,), init_values))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), init_values))

    def forward(self, v: torch.Tensor, l: torch.Tensor, v_padding_mask: torch.Tensor | None = None,
                l_padding_mask: torch.Tensor | None = None):
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l, v_padding_mask, l_padding_mask)
        return v + self.drop_path(self.gamma_v * delta_v), l + self.drop_path(self.gamma_l * delta_l)
