"""LLaVA's LLaMA: transformers' LlamaForCausalLM plus the ``mm_projector`` (spec §1.2).

Parameter names equal the LLaVA-LLaMA-2 checkpoints (``model.mm_projector.*`` next to
``model.layers.*``), so their shards load without renaming. The splicing helpers put projected
image features at the `<im_patch>` positions and region vectors at the `<bbox>` positions of the
token embeddings; both are out-of-place so autograd sees a plain function of the embeddings.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from chatterbox.model.config import LanguageConfig
from chatterbox.tokens import SpecialTokenIds


def llama_config(cfg: LanguageConfig, mm_hidden_size: int, vocab_size: int | None = None) -> LlamaConfig:
    """The LlamaConfig of the architecture fields of ``cfg`` (used when no checkpoint folder is given)."""
    return LlamaConfig(
        vocab_size=vocab_size if vocab_size is not None else cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        initializer_range=cfg.initializer_range,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        mm_hidden_size=mm_hidden_size,
        attn_implementation=cfg.attn_implementation,
    )


class LlavaLlamaModel(LlamaModel):
    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        # Single linear projector CLIP width -> LLM width (LLaVA-LLaMA-2 "lightning" checkpoints).
        self.mm_projector = nn.Linear(config.mm_hidden_size, config.hidden_size)
        self.post_init()


class LlavaLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: LlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def resize_vocabulary(lm: LlavaLlamaForCausalLM, new_size: int, std: float) -> None:
    """Grow embed_tokens and lm_head to ``new_size`` rows; new rows ~ N(0, std) like upstream (HF default).

    Written out instead of ``resize_token_embeddings`` so the init of the new rows is explicit and does
    not depend on transformers' version-specific "mean of old rows" heuristics.
    """
    old_embed = lm.get_input_embeddings()
    old_size, width = old_embed.weight.shape
    if new_size < old_size:
        raise ValueError(f"tokenizer has {new_size} tokens but the LLM already has {old_size} embedding rows")
    if new_size == old_size:
        return
    weight = old_embed.weight
    new_embed = nn.Embedding(new_size, width, padding_idx=old_embed.padding_idx, device=weight.device,
                             dtype=weight.dtype)
    new_head = nn.Linear(width, new_size, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for new, old in ((new_embed.weight, weight), (new_head.weight, lm.lm_head.weight)):
            new[:old_size].copy_(old)
            new[old_size:].normal_(mean=0.0, std=std)
    lm.set_input_embeddings(new_embed)
    lm.lm_head = new_head
    lm.config.vocab_size = new_size
    lm.vocab_size = new_size


def _where(sample_ids: Sequence[str] | None, row: int) -> str:
    return f"sample {sample_ids[row]!r} (batch row {row})" if sample_ids is not None else f"batch row {row}"


def check_image_layout(input_ids: torch.Tensor, ids: SpecialTokenIds, num_patches: int,
                       sample_ids: Sequence[str] | None = None) -> torch.Tensor:
    """Validate the `<im_start>` 256×`<im_patch>` `<im_end>` blocks; return the number of images per row."""
    counts = []
    for row, seq in enumerate(input_ids.tolist()):
        starts = [t for t, tok in enumerate(seq) if tok == ids.im_start]
        num_ends = sum(tok == ids.im_end for tok in seq)
        num_patch_tokens = sum(tok == ids.im_patch for tok in seq)
        if len(starts) != num_ends:
            raise ValueError(f"{_where(sample_ids, row)}: {len(starts)} <im_start> but {num_ends} <im_end> tokens")
        if len(starts) > 1:
            raise ValueError(f"{_where(sample_ids, row)}: {len(starts)} images in one sequence; one is supported")
        for p in starts:
            block = seq[p + 1:p + 1 + num_patches]
            end = seq[p + 1 + num_patches] if p + 1 + num_patches < len(seq) else None
            if block.count(ids.im_patch) != num_patches or end != ids.im_end:
                raise ValueError(f"{_where(sample_ids, row)}: <im_start> at position {p} is not followed by "
                                 f"{num_patches} <im_patch> tokens and <im_end> (truncated prompt?)")
        if num_patch_tokens != num_patches * len(starts):
            raise ValueError(f"{_where(sample_ids, row)}: {num_patch_tokens} <im_patch> tokens outside an "
                             "<im_start>...<im_end> block")
        counts.append(len(starts))
    return torch.tensor(counts, dtype=torch.long)


def splice_image_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, patch_token_id: int,
                          image_embeds_per_row: torch.Tensor, num_patch_positions: int) -> torch.Tensor:
    """Replace `<im_patch>` embeddings by the projected patch features of each row's image.

    image_embeds_per_row [R,P,H] holds the features of the rows that have an image (ascending), whose
    `<im_patch>` positions come in row-major order, which is also masked_scatter's order.
    ``num_patch_positions`` is the number of `<im_patch>` tokens, counted by the caller on the host (so that
    a device ``input_ids`` costs no synchronisation here).
    """
    source = image_embeds_per_row.to(inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1])
    if source.shape[0] != num_patch_positions:
        raise ValueError(f"{source.shape[0]} image feature vectors for {num_patch_positions} <im_patch> positions")
    if num_patch_positions == 0:
        return inputs_embeds
    mask = (input_ids == patch_token_id).unsqueeze(-1).expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask, source)


def inject_region_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, bbox_token_id: int,
                           region_embeds: torch.Tensor, num_bbox_positions: int) -> torch.Tensor:
    """Replace `<bbox>` embeddings by region vectors [R,H] (row-major order of the `<bbox>` tokens);
    ``num_bbox_positions`` is the number of `<bbox>` tokens, counted by the caller on the host."""
    if region_embeds.shape[0] != num_bbox_positions:
        raise ValueError(f"{region_embeds.shape[0]} region vectors for {num_bbox_positions} <bbox> tokens")
    if num_bbox_positions == 0:
        return inputs_embeds
    mask = (input_ids == bbox_token_id).unsqueeze(-1).expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask, region_embeds.to(inputs_embeds.dtype))
