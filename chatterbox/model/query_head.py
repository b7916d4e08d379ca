"""The `[VG]` query head (upstream's ``text_hidden_fcs``, spec §1.4).

The query of a `[VG]` token is read from the final (post-norm) LLM hidden state of the token *before*
it — the position whose output predicts `[VG]` — and projected Linear-ReLU-Linear to the vision
branch's 256-d "text" width. Every `[VG]` of a sequence yields one query, in order of appearance.
"""
from __future__ import annotations

import torch
from torch import nn

from chatterbox.model.config import QueryHeadConfig


def positions_before_token(input_ids: torch.Tensor, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of every position t with input_ids[row, t+1] == token_id, row-major order.

    A token at column 0 has no predecessor and yields nothing (cannot happen after BOS).
    """
    follows = torch.zeros_like(input_ids, dtype=torch.bool)
    follows[:, :-1] = input_ids[:, 1:] == token_id
    rows, cols = follows.nonzero(as_tuple=True)
    return rows, cols


class QueryHead(nn.Module):
    def __init__(self, cfg: QueryHeadConfig, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, cfg.out_dim), nn.Dropout(cfg.dropout)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., out_dim]."""
        return self.mlp(hidden_states.to(self.mlp[0].weight.dtype))
