"""Deformable encoder/decoder of GroundingDINO with the [VG] query embedding(s) as the "text".

Encoder layer k: image<->text fusion (BiAttentionBlock) -> text enhancer -> deformable self-attention
over all feature levels. Two-stage "standard" query selection picks the ``num_queries`` encoder tokens
whose best text logit is highest; their refined proposal boxes seed the decoder, whose content queries
are the learned ``tgt_embed``. Decoder layer: self-attention -> text cross-attention -> deformable
cross-attention with 4-d reference boxes -> FFN; boxes are refined after every layer.
(spec/upstream.md §1.5; upstream transformer.py.)

Reference boxes, proposals and position encodings are kept in at least float32 (`at_least_float32`): in bf16
a coordinate has ~3 significant digits, which is coarser than one cell of the largest feature map; a
float64 model computes them in float64.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from chatterbox.precision import at_least_float32

from .fusion import BiAttentionBlock
from .heads import MLP, ContrastiveEmbed, inverse_sigmoid
from .ms_deform_attn import MultiScaleDeformableAttention
from .text_enhancer import TextEnhancerLayer, activation_fn

__all__ = ["DeformableTransformer", "TransformerOutput", "sine_embed", "encoder_output_proposals"]


def sine_embed(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """[..., K] coordinates in [0,1] -> [..., K*num_feats] sin/cos features of 2*pi*coord."""
    dtype = at_least_float32(coords.dtype)
    index = torch.arange(num_feats, dtype=dtype, device=coords.device)
    freq = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    coords = coords.to(dtype)
    angles = coords[..., None] * (2 * math.pi) / freq  # [..., K, F]
    features = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return features.flatten(-2)


def box_position_embedding(boxes_cxcywh: torch.Tensor, num_feats: int) -> torch.Tensor:
    """Decoder query position features: sine features in the order (y, x, w, h), as upstream."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    return sine_embed(torch.stack((cy, cx, w, h), dim=-1), num_feats)


def valid_ratios_of(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N,H,W] padding mask -> [N,2] fraction (w, h) of the map that is real image, in ``dtype``."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(dtype) / h
    valid_w = (~mask[:, 0, :]).sum(1).to(dtype) / w
    return torch.stack([valid_w, valid_h], dim=-1)


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Centre of every token of every level, normalised by the valid extent -> [N, S, L, 2] (x, y)."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
            torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device), indexing="ij")
        ref_y = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def encoder_output_proposals(memory: torch.Tensor, padding_mask: torch.Tensor,
                             spatial_shapes: list[tuple[int, int]]):
    """One proposal box per encoder token: centre of its cell, side 0.05 * 2**level.

    Returns (memory with padded/invalid tokens zeroed, proposals as logits [N,S,4] (at least float32) with
    +inf where the token is padding or the box is not inside (0.01, 0.99)).
    """
    n = memory.shape[0]
    dtype = at_least_float32(memory.dtype)
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start:start + h * w].view(n, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=memory.device),
                                torch.arange(w, dtype=dtype, device=memory.device), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None]  # [1,h,w,2]
        scale = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2).to(dtype)
        centres = (grid + 0.5) / scale
        sizes = torch.full_like(centres, 0.05 * 2.0 ** lvl)
        proposals.append(torch.cat((centres, sizes), -1).view(n, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, activation: str, n_levels: int,
                 n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dim=d_model, num_heads=n_heads,
                                                       num_levels=n_levels, num_points=n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        attended = self.self_attn(src + pos, src, reference_points, spatial_shapes, level_start_index,
                                  padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, activation: str, n_levels: int,
                 n_heads: int, n_points: int, use_text_cross_attention: bool):
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(embed_dim=d_model, num_heads=n_heads,
                                                        num_levels=n_levels, num_points=n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.use_text_cross_attention = use_text_cross_attention
        if use_text_cross_attention:
            self.ca_text = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
            self.catext_dropout = nn.Dropout(dropout)
            self.catext_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, memory_padding_mask, spatial_shapes,
                level_start_index, text, text_padding_mask):
        """tgt/query_pos [N,Q,C]; reference_points [N,Q,L,4]; memory [N,S,C]; text [N,T,C]."""
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        if self.use_text_cross_attention:
            attended = self.ca_text(tgt + query_pos, text, text, key_padding_mask=text_padding_mask,
                                    need_weights=False)[0]
            tgt = self.catext_norm(tgt + self.catext_dropout(attended))
        attended = self.cross_attn(tgt + query_pos, memory, reference_points, spatial_shapes, level_start_index,
                                   memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[nn.Module], text_layers: list[nn.Module], fusion_layers: list[nn.Module],
                 use_transformer_ckpt: bool, use_fusion_ckpt: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.text_layers = nn.ModuleList(text_layers)
        self.fusion_layers = nn.ModuleList(fusion_layers)
        self.use_transformer_ckpt = use_transformer_ckpt
        self.use_fusion_ckpt = use_fusion_ckpt

    def forward(self, src, pos, spatial_shapes_list, spatial_shapes, level_start_index, valid_ratios, padding_mask,
                text, text_padding_mask, text_pos):
        reference_points = encoder_reference_points(spatial_shapes_list, valid_ratios)
        checkpoint_on = self.training
        for i, layer in enumerate(self.layers):
            if len(self.fusion_layers):
                src, text = _maybe_checkpoint(checkpoint_on and self.use_fusion_ckpt, self.fusion_layers[i],
                                              src, text, padding_mask, text_padding_mask)
            if len(self.text_layers):
                text = self.text_layers[i](text, text_pos, text_padding_mask)
            src = _maybe_checkpoint(checkpoint_on and self.use_transformer_ckpt, layer, src, pos, reference_points,
                                    spatial_shapes, level_start_index, padding_mask)
        return src, text


class TransformerDecoder(nn.Module):
    def __init__(self, layers: list[nn.Module], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.bbox_embed: nn.ModuleList | None = None  # set by the owner (shared with its box heads)

    def forward(self, tgt, reference_boxes, memory, memory_padding_mask, spatial_shapes, level_start_index,
                valid_ratios, text, text_padding_mask):
        """reference_boxes: [N,Q,4] cxcywh in [0,1] (at least float32). Returns per layer the normed hidden
        states and the reference boxes the layer started from (plus the last refinement)."""
        if self.bbox_embed is None:
            raise RuntimeError("TransformerDecoder.bbox_embed must be set before use (iterative refinement)")
        hidden_states, references = [], [reference_boxes]
        output = tgt
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [N,1,L,4]
        for i, layer in enumerate(self.layers):
            reference_input = reference_boxes[:, :, None] * ratios  # [N,Q,L,4]
            query_sine = box_position_embedding(reference_input[:, :, 0, :], self.d_model // 2).to(output.dtype)
            query_pos = self.ref_point_head(query_sine)
            output = layer(output, query_pos, reference_input, memory, memory_padding_mask, spatial_shapes,
                           level_start_index, text, text_padding_mask)
            refined = (self.bbox_embed[i](output) + inverse_sigmoid(reference_boxes)).sigmoid()
            reference_boxes = refined.detach()
            references.append(refined)
            hidden_states.append(self.norm(output))
        return hidden_states, references


class TransformerOutput(NamedTuple):  # a tuple: ZeRO-3's backward hooks find the tensors inside it
    hidden_states: list[torch.Tensor]    # per decoder layer, [N, Q, C] (after the final norm)
    references: list[torch.Tensor]       # dec_layers + 1 boxes [N, Q, 4] cxcywh (sigmoid space)
    encoder_hidden: torch.Tensor         # [N, Q, C] the selected encoder tokens (two-stage)
    encoder_boxes: torch.Tensor          # [N, Q, 4] their boxes (not detached)
    initial_boxes: torch.Tensor          # [N, Q, 4] their proposals before the box head (cell centre, 0.05*2**level)
    text: torch.Tensor                   # [N, T, C] text tokens after the encoder


class DeformableTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_dim
        self.d_model = d
        self.num_queries = cfg.num_queries
        self.num_feature_levels = cfg.num_feature_levels
        enc_layers = [DeformableEncoderLayer(d, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                             cfg.num_feature_levels, cfg.nheads, cfg.enc_n_points)
                      for _ in range(cfg.enc_layers)]
        text_layers = [TextEnhancerLayer(d, cfg.text_enhancer_nheads, cfg.text_enhancer_dim_feedforward,
                                         cfg.text_dropout) for _ in range(cfg.enc_layers)] \
            if cfg.use_text_enhancer else []
        fusion_layers = [BiAttentionBlock(d, d, cfg.fusion_embed_dim, cfg.fusion_nheads, cfg.fusion_dropout,
                                          cfg.fusion_droppath, cfg.fusion_init_values, cfg.fusion_logit_clamp)
                         for _ in range(cfg.enc_layers)] if cfg.use_fusion_layer else []
        self.encoder = TransformerEncoder(enc_layers, text_layers, fusion_layers, cfg.use_transformer_ckpt,
                                          cfg.fusion_use_checkpoint)
        dec_layers = [DeformableDecoderLayer(d, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                             cfg.num_feature_levels, cfg.nheads, cfg.dec_n_points,
                                             cfg.use_text_cross_attention) for _ in range(cfg.dec_layers)]
        self.decoder = TransformerDecoder(dec_layers, d)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_out_bbox_embed: nn.Module | None = None  # set by the owner (a copy of the box head)
        self.enc_out_class_embed = ContrastiveEmbed(cfg.max_text_len, cfg.pad_logits_to_max_text_len)
        self._shape_tensors: dict[tuple, torch.Tensor] = {}
        self._reset_parameters()

    def _spatial_shapes(self, shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """The feature pyramid's [levels, 2] (h, w) as a long tensor on ``device``, copied once per layout:
        a host->device copy per call could not be captured in a CUDA graph (and a blocking one would wait
        for the backbone queued before it)."""
        key = (tuple(shapes), str(device))
        tensor = self._shape_tensors.get(key)
        if tensor is None:
            tensor = torch.tensor(shapes, dtype=torch.long).to(device, non_blocking=True)
            self._shape_tensors[key] = tensor
        return tensor

    def _reset_parameters(self) -> None:
        # Upstream order: xavier on every matrix, then the deformable-attention init, then level_embed.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], positions: list[torch.Tensor],
                text: torch.Tensor, text_token_mask: torch.Tensor,
                text_padding: bool | None = None) -> TransformerOutput:
        """srcs/positions [N,C,H_l,W_l], masks [N,H_l,W_l] (True = padding); text [N,T,C], text_token_mask
        [N,T] (True = valid); text_padding: whether any text token is padding, if the caller knows (None:
        read from the mask, one device synchronisation). Without padding no text mask is applied."""
        if self.enc_out_bbox_embed is None:
            raise RuntimeError("DeformableTransformer.enc_out_bbox_embed must be set before use")
        n = srcs[0].shape[0]
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(positions)], 1)
        if src_flat.shape[1] < self.num_queries:
            raise ValueError(f"the {src_flat.shape[1]} encoder tokens of a {shapes} feature pyramid are fewer "
                             f"than num_queries={self.num_queries}; use larger images or fewer queries")
        spatial_shapes = self._spatial_shapes(shapes, src_flat.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        coord_dtype = at_least_float32(src_flat.dtype)
        valid_ratios = torch.stack([valid_ratios_of(m, coord_dtype) for m in masks], 1)  # [N,L,2]
        if text_padding is None:
            text_padding = bool((~text_token_mask).any())
        # None = no padded text token: the attention layers then skip masking (same result, fewer kernels).
        text_padding_mask = ~text_token_mask if text_padding else None
        position_ids = torch.arange(text.shape[1], device=text.device, dtype=coord_dtype)
        text_pos = sine_embed(position_ids[:, None], self.d_model).to(text.dtype)[None].expand(n, -1, -1)

        memory, text = self.encoder(src_flat, pos_flat, shapes, spatial_shapes, level_start_index, valid_ratios,
                                    mask_flat, text, text_padding_mask, text_pos)

        # Two-stage query selection.
        output_memory, proposals = encoder_output_proposals(memory, mask_flat, shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        token_logits = self.enc_out_class_embed(output_memory, text, text_token_mask).max(-1).values
        coords_unsig = self.enc_out_bbox_embed(output_memory) + proposals  # proposals' dtype (>= float32)
        topk = torch.topk(token_logits, self.num_queries, dim=1).indices  # [N,Q]
        boxes_unsig = torch.gather(coords_unsig, 1, topk.unsqueeze(-1).expand(-1, -1, 4))
        initial_boxes = torch.gather(proposals, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).sigmoid()
        encoder_hidden = torch.gather(output_memory, 1, topk.unsqueeze(-1).expand(-1, -1, self.d_model))
        # the learned queries through the embedding's own forward (not .weight): ZeRO-3 gathers a module's
        # parameters only while that module runs
        tgt = self.tgt_embed(torch.arange(self.num_queries, device=memory.device))[None].expand(n, -1, -1)

        hidden_states, references = self.decoder(tgt, boxes_unsig.detach().sigmoid(), memory, mask_flat,
                                                 spatial_shapes, level_start_index, valid_ratios, text,
                                                 text_padding_mask)
        return TransformerOutput(hidden_states, references, encoder_hidden, boxes_unsig.sigmoid(), initial_boxes, text)
