"""Prediction heads: the box MLP and the parameter-free contrastive classifier (query . text)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "ContrastiveEmbed", "inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1-eps] (upstream's eps)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """Linear layers with ReLU between them; ``layers.N`` naming as in the checkpoints."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ContrastiveEmbed(nn.Module):
    """Logits = hidden . text^T; padded text slots get -inf. Optionally padded to ``max_text_len``
    columns (upstream's layout, where only the first column is finite for a one-token query)."""

    def __init__(self, max_text_len: int = 256, pad_to_max_text_len: bool = False):
        super().__init__()
        self.max_text_len = max_text_len
        self.pad_to_max_text_len = pad_to_max_text_len

    def forward(self, hidden: torch.Tensor, text: torch.Tensor, text_token_mask: torch.Tensor) -> torch.Tensor:
        """hidden [...,N,Q,C], text [N,T,C], text_token_mask [N,T] (True = valid) -> [...,N,Q,T or
        max_text_len] (leading dimensions, e.g. decoder layers, broadcast)."""
        logits = hidden @ text.transpose(-1, -2)
        logits = logits.masked_fill(~text_token_mask[:, None, :], float("-inf"))
        if self.pad_to_max_text_len and logits.shape[-1] < self.max_text_len:
            logits = F.pad(logits, (0, self.max_text_len - logits.shape[-1]), value=float("-inf"))
        return logits
