"""Text-enhancer layer: a post-norm transformer encoder layer over the text tokens (here the [VG]
query embeddings), run once per encoder layer after the fusion layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TextEnhancerLayer", "activation_fn"]


def activation_fn(name: str):
    return {"relu": F.relu, "gelu": F.gelu}[name]


class TextEnhancerLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0,
                 activation: str = "relu"):
        super().__init__()
        self.nhead = nhead
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)

    def forward(self, text: torch.Tensor, text_pos: torch.Tensor, text_padding_mask: torch.Tensor | None):
        """text, text_pos [N,T,C]; text_padding_mask [N,T] True = padding (or None). Returns [N,T,C]."""
        attn_mask = None
        if text_padding_mask is not None and bool(text_padding_mask.any()):
            # Every token may see the valid tokens and itself (so a padded row never has no key).
            n, t = text_padding_mask.shape
            eye = torch.eye(t, dtype=torch.bool, device=text.device)
            blocked = text_padding_mask[:, None, :] & ~eye
            attn_mask = blocked.repeat_interleave(self.nhead, dim=0)
        qk = text + text_pos
        text = self.norm1(text + self.dropout1(self.self_attn(qk, qk, text, attn_mask=attn_mask,
                                                              need_weights=False)[0]))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(text))))
        return self.norm2(text + self.dropout2(ffn))
