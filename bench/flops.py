"""Model FLOPs of the LLM part of one training micro-step (for model-FLOPs utilisation, MFU).

What is counted (a multiply-add = 2 FLOPs; recomputation by gradient checkpointing is NOT counted, as
MFU counts the work the model needs, not the work an implementation chooses to do):

* every matmul weight of the decoder layers, split by whether it trains:
  - frozen weight W (q/k/v/o/gate/up/down base weights): forward 2·|W| per token, backward only the
    gradient w.r.t. its input (the activations need it, since trainable weights sit below:
    LoRA, embed_tokens, the region encoder) = 2·|W|  ->  4·|W| per token;
  - trainable weight (LoRA A/B): forward 2·|W|, backward input-grad 2·|W| + weight-grad 2·|W|
    ->  6·|W| per token;
* ``lm_head`` (trainable, 6·|W|) on the positions whose logits the loss uses: n_b − 1 per row (none on a
  batch whose LM loss is multiplied by 0, i.e. a grounding batch of upstream's recipe: not needed);
* causal self-attention scores and values: forward 2·(n²/2)·h for QKᵀ and the same for AV per layer
  and row (only the causal half is needed), backward twice the forward  ->  6·h·n_b² per layer and row.

So F = Σ_rows [ n·(4·N_frozen + 6·N_trainable) + (n − 1)·6·N_lm_head + 6·L·h·n² ], with n the real
(unpadded) tokens of the row. Not counted: embedding lookups (no matmul), norms, RoPE, softmax, the
CLIP tower, ``mm_projector`` (its input is frozen CLIP output: forward only), region encoder, query
head and the vision branch; ``llm_step_flops`` is therefore a lower bound of the step's total work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn


@dataclass(frozen=True)
class LlmMatmulParams:
    frozen: int  # decoder-layer matmul weights without grad (per token: 4 FLOPs each)
    trainable: int  # decoder-layer matmul weights with grad, e.g. LoRA A/B (per token: 6 FLOPs each)
    lm_head: int  # output projection (trainable in ChatterBox; 6 FLOPs each per supervised position)
    lm_head_trainable: bool
    num_layers: int
    hidden_size: int


def llm_matmul_params(causal_lm: nn.Module) -> LlmMatmulParams:
    """Count the matmul weights of a (LoRA-wrapped or plain) LlamaForCausalLM's decoder and head."""
    frozen = trainable = 0
    layers = causal_lm.model.layers
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                if module.weight.requires_grad:
                    trainable += module.weight.numel()
                else:
                    frozen += module.weight.numel()
    head = causal_lm.lm_head
    return LlmMatmulParams(frozen=frozen, trainable=trainable, lm_head=head.weight.numel(),
                           lm_head_trainable=head.weight.requires_grad, num_layers=len(layers),
                           hidden_size=causal_lm.config.hidden_size)


def llm_step_flops(params: LlmMatmulParams, row_lengths: Iterable[int], lm_loss: bool = True) -> float:
    """Model FLOPs of forward + backward of the LLM part for rows of ``row_lengths`` real tokens
    (``lm_loss=False``: the batch's LM loss is not needed, so neither is lm_head)."""
    per_token = 4 * params.frozen + 6 * params.trainable
    head = (6 if params.lm_head_trainable else 4) * params.lm_head * lm_loss
    total = 0
    for n in row_lengths:
        n = int(n)
        if n < 0:
            raise ValueError(f"row length {n} < 0")
        total += n * per_token + max(n - 1, 0) * head + 6 * params.num_layers * params.hidden_size * n * n
    return float(total)
