"""The vision branch: GroundingDINO whose "text" is one 256-d [VG] query embedding per grounding request.

Entry points (spec/upstream.md §1.5, §1.10):
* ``forward_backbone(images, masks)`` -> BackboneFeatures (frozen Swin, run under no_grad);
* ``forward_enc_dec(features, queries, query_image_index)`` -> decoder outputs, one detection set per
  query; an image may carry several queries (its features are shared, each query is decoded on its own);
* ``predict_boxes(outputs, image_sizes_wh)`` -> the best box per query with upstream's threshold rule.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.precision import at_least_float32

from .backbone import BackboneFeatures, Joiner, SinePositionEncoding, SwinTransformer, downsample_mask
from .config import VisionBranchConfig, load_vision_config
from .heads import MLP, ContrastiveEmbed, inverse_sigmoid
from .transformer import DeformableTransformer

__all__ = ["VisionBranch", "BoxPrediction", "build_vision_branch"]

# Upstream's answer when no query passes the threshold (spec/evaluation_reference.md §2).
FALLBACK_BOX_XYXY_ABS = (0.0, 0.0, 1.0, 1.0)


@dataclass
class BoxPrediction:
    """Best box per query. Tensors have one row per query."""

    boxes_xyxy_abs: torch.Tensor      # [Q,4] float32 (float64 model: float64), pixels of the original image
    boxes_cxcywh_norm: torch.Tensor   # [Q,4] same dtype, fractions of the original image
    scores: torch.Tensor              # [Q] same dtype, max sigmoid probability of the box (0 for the fallback)
    found: torch.Tensor               # [Q] bool, False where upstream's fallback box [0,0,1,1] was used
    query_index: torch.Tensor         # [Q] long, which of the 900 decoder queries was chosen (-1 fallback)

    @property
    def boxes_xyxy_abs_truncated(self) -> torch.Tensor:
        """Upstream's stored form: every coordinate truncated towards zero with int()."""
        return torch.trunc(self.boxes_xyxy_abs).long()


class VisionBranch(nn.Module):
    def __init__(self, cfg: VisionBranchConfig | None = None):
        super().__init__()
        cfg = cfg or VisionBranchConfig()
        self.cfg = cfg
        d = cfg.hidden_dim
        swin = SwinTransformer(cfg.swin_embed_dim, cfg.swin_depths, cfg.swin_num_heads, cfg.swin_window_size,
                               cfg.return_interm_indices, cfg.swin_patch_size, cfg.swin_mlp_ratio,
                               cfg.swin_drop_path_rate, cfg.swin_use_checkpoint)
        self.backbone = Joiner(swin, SinePositionEncoding(d // 2, cfg.pe_temperature_h, cfg.pe_temperature_w,
                                                          normalize=True))
        in_channels = cfg.backbone_out_channels
        projections = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in in_channels]
        extra_in = in_channels[-1]
        for _ in range(cfg.num_feature_levels - len(in_channels)):
            projections.append(nn.Sequential(nn.Conv2d(extra_in, d, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, d)))
            extra_in = d
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = DeformableTransformer(cfg)
        box_head = MLP(d, d, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        # One box head shared by all decoder layers, registered under both names the checkpoints use.
        self.bbox_embed = nn.ModuleList([box_head] * cfg.dec_layers)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.enc_out_bbox_embed = box_head if cfg.two_stage_bbox_embed_share else copy.deepcopy(box_head)
        self.class_embed = ContrastiveEmbed(cfg.max_text_len, cfg.pad_logits_to_max_text_len)
        # Set from outside to run the frozen backbone another way (e.g. replayed from CUDA graphs): a callable
        # with flat_backbone's signature and results. None: the backbone module itself.
        self.backbone_runner = None

    def flat_backbone(self, images: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's outputs as one flat list: feature maps, then masks, then positions."""
        features = self.backbone(images, masks)
        return [*features.feature_maps, *features.masks, *features.positions]

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, name_or_path_or_cfg) -> "VisionBranch":
        cfg = name_or_path_or_cfg if isinstance(name_or_path_or_cfg, VisionBranchConfig) \
            else load_vision_config(name_or_path_or_cfg)
        return cls(cfg)

    def train(self, mode: bool = True) -> "VisionBranch":
        super().train(mode)
        if self.cfg.freeze_backbone and not self.cfg.frozen_backbone_train_mode:
            self.backbone.eval()  # frozen features: no stochastic depth
        return self

    # ------------------------------------------------------------------------------------------------
    def forward_backbone(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> BackboneFeatures:
        """images [B,3,H,W] normalised pixels; masks [B,H,W] bool, True = padding (None: no padding)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
        if masks is None:
            masks = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=images.device)
        elif masks.shape != (images.shape[0], *images.shape[-2:]) or masks.dtype != torch.bool:
            raise ValueError(f"masks must be a bool tensor of shape {(images.shape[0], *images.shape[-2:])}, "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        if self.cfg.freeze_backbone:
            with torch.no_grad():
                if self.backbone_runner is None:
                    return self.backbone(images, masks)
                flat = self.backbone_runner(images, masks)
            levels = len(flat) // 3
            return BackboneFeatures(flat[:levels], flat[levels:2 * levels], flat[2 * levels:], masks)
        return self.backbone(images, masks)

    def project_features(self, features: BackboneFeatures):
        """Input projections (1x1 conv + GN) per level, plus the extra stride-2 levels -> (srcs, masks, positions)."""
        srcs = [proj(f) for proj, f in zip(self.input_proj, features.feature_maps)]
        masks, positions = list(features.masks), list(features.positions)
        for lvl in range(len(srcs), self.cfg.num_feature_levels):
            src = self.input_proj[lvl](features.feature_maps[-1] if lvl == len(features.feature_maps) else srcs[-1])
            dtype = at_least_float32(src.dtype)
            mask = downsample_mask(features.image_mask, src.shape[-2:], dtype)
            srcs.append(src)
            masks.append(mask)
            positions.append(self.backbone.position_encoding(mask, dtype).to(src.dtype))
        return srcs, masks, positions

    def forward_enc_dec(self, features: BackboneFeatures, queries: torch.Tensor,
                        query_image_index: torch.Tensor | None = None,
                        query_token_mask: torch.Tensor | None = None) -> dict:
        """Decode one detection set per query.

        queries: [Q,C] (one [VG] embedding per grounding request) or [Q,T,C] (T tokens per request);
        query_image_index: [Q] long, the image of ``features`` each query refers to (default: query i ->
        image i); query_token_mask: [Q,T] bool, True = valid token (default all valid).
        Pass query_image_index as a CPU tensor (or list) and leave query_token_mask at its default to
        validate without a device round trip: a GPU index or a given mask costs one synchronisation.

        Returns a dict (upstream's keys):
        * ``pred_logits`` [Q,num_queries,T] (or max_text_len with cfg.pad_logits_to_max_text_len, -inf
          padded), ``pred_boxes`` [Q,num_queries,4] normalised cxcywh: the last decoder layer;
        * ``aux_outputs``: the same two keys for decoder layers 0..L-2;
        * ``interm_outputs``: the encoder's two-stage selection (its logits and refined boxes);
        * ``interm_outputs_for_matching_pre``: the same logits with the selected tokens' proposals before
          refinement (cell centre, side 0.05 * 2**level), the decoder's initial boxes;
        * ``text_token_mask`` [Q,T] bool, True = valid token; with cfg.pad_logits_to_max_text_len also
          ``text_mask`` [Q,max_text_len], upstream's layout (False beyond T).
        """
        queries, query_image_index, query_token_mask, one_query_per_image, text_padding = self._check_queries(
            features, queries, query_image_index, query_token_mask)
        return self.decode_checked(features, queries, query_image_index, query_token_mask, one_query_per_image,
                                   text_padding)

    def decode_checked(self, features: BackboneFeatures, queries: torch.Tensor, query_image_index: torch.Tensor,
                       query_token_mask: torch.Tensor, one_query_per_image: bool = False,
                       text_padding: bool = True) -> dict:
        """forward_enc_dec on arguments it has validated: queries [Q,T,C], query_image_index [Q] long and
        query_token_mask [Q,T] bool on the queries' device. Only queues device work (no host
        synchronisation, and no host->device copy once the transformer has seen this feature layout), so
        it can be captured in a CUDA graph. ``one_query_per_image``: query i uses image i for all i (skips
        the gather); ``text_padding=False`` promises that every token is valid (skips the masking)."""
        srcs, masks, positions = self.project_features(features)
        if not one_query_per_image:
            pick = lambda ts: [t.index_select(0, query_image_index) for t in ts]  # noqa: E731
            srcs, masks, positions = pick(srcs), pick(masks), pick(positions)
        out = self.transformer(srcs, masks, positions, queries, query_token_mask, text_padding=text_padding)

        # The box head is shared by the decoder layers: all layers in one batch.
        hidden = torch.stack(out.hidden_states)  # [layers, Q, num_queries, C]
        references = torch.stack(out.references[:-1])
        boxes = (self.bbox_embed[0](hidden) + inverse_sigmoid(references)).sigmoid().unbind(0)
        logits = self.class_embed(hidden, out.text, query_token_mask).unbind(0)
        result = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "text_token_mask": query_token_mask}
        if self.cfg.aux_loss:
            result["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
        encoder_logits = self.transformer.enc_out_class_embed(out.encoder_hidden, out.text, query_token_mask)
        result["interm_outputs"] = {"pred_logits": encoder_logits, "pred_boxes": out.encoder_boxes}
        result["interm_outputs_for_matching_pre"] = {"pred_logits": encoder_logits, "pred_boxes": out.initial_boxes}
        if self.cfg.pad_logits_to_max_text_len:
            result["text_mask"] = F.pad(query_token_mask, (0, self.cfg.max_text_len - query_token_mask.shape[1]),
                                        value=False)
        return result

    def forward(self, images: torch.Tensor, queries: torch.Tensor, query_image_index: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, query_token_mask: torch.Tensor | None = None) -> dict:
        return self.forward_enc_dec(self.forward_backbone(images, masks), queries, query_image_index,
                                    query_token_mask)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_boxes(self, outputs: dict, image_sizes_wh, box_threshold: float | None = None) -> BoxPrediction:
        """Best box per query, upstream's rule: among the decoder queries whose best sigmoid probability
        exceeds ``box_threshold`` (default cfg.box_threshold = 0.3) take the highest; if none does, the
        box is [0,0,1,1] pixels with score 0.

        image_sizes_wh: [Q,2] (or a list of (width, height)), the ORIGINAL size of each query's image.
        """
        threshold = self.cfg.box_threshold if box_threshold is None else box_threshold
        return select_best_boxes(outputs["pred_logits"], outputs["pred_boxes"], image_sizes_wh, threshold)

    # ------------------------------------------------------------------------------------------------
    def _check_queries(self, features, queries, query_image_index, query_token_mask):
        """Validate the query arguments. Returns (queries [Q,T,C], query_image_index on the queries' device,
        query_token_mask, whether query i uses image i for all i, whether any text token is padding)."""
        d = self.cfg.hidden_dim
        if queries.dim() == 2:
            queries = queries[:, None, :]
        if queries.dim() != 3 or queries.shape[-1] != d:
            raise ValueError(f"queries must be [Q,{d}] or [Q,T,{d}], got shape {tuple(queries.shape)}")
        num_q, num_t = queries.shape[:2]
        if num_t > self.cfg.max_text_len:
            raise ValueError(f"queries have {num_t} tokens each, more than max_text_len={self.cfg.max_text_len}")
        if num_q == 0:
            raise ValueError("forward_enc_dec needs at least one query")
        device = queries.device
        if query_image_index is None:
            if num_q != features.batch_size:
                raise ValueError(f"{num_q} queries for {features.batch_size} images: pass query_image_index")
            query_image_index = torch.arange(num_q)
        query_image_index = torch.as_tensor(query_image_index)
        if query_image_index.shape != (num_q,) or query_image_index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"query_image_index must be an integer tensor of shape [{num_q}], got "
                             f"{query_image_index.dtype} {tuple(query_image_index.shape)}")
        if query_token_mask is not None and (query_token_mask.shape != (num_q, num_t)
                                             or query_token_mask.dtype != torch.bool):
            raise ValueError(f"query_token_mask must be bool [{num_q},{num_t}], got {query_token_mask.dtype} "
                             f"{tuple(query_token_mask.shape)}")
        # The values are read in ONE host transfer, and in none when index and mask live on the host.
        on = query_token_mask.device if query_token_mask is not None and query_token_mask.is_cuda \
            else query_image_index.device
        index = query_image_index.to(on)
        stats = [index.min(), index.max(), (index == torch.arange(num_q, device=on)).all()
                 if num_q == features.batch_size else index.new_zeros(())]
        if query_token_mask is not None:
            mask = query_token_mask.to(on)
            stats += [mask.any(dim=1).all(), (~mask).any()]
        low, high, identity, *mask_stats = torch.stack([v.long() for v in stats]).tolist()
        if low < 0 or high >= features.batch_size:
            raise ValueError(f"query_image_index {query_image_index.tolist()} out of range for "
                             f"{features.batch_size} images")
        if query_token_mask is None:
            query_token_mask = torch.ones((num_q, num_t), dtype=torch.bool, device=device)
            text_padding = False
        else:
            if not mask_stats[0]:
                raise ValueError("every query needs at least one valid token in query_token_mask")
            text_padding = bool(mask_stats[1])
        query_image_index = query_image_index.long().to(device, non_blocking=True)
        return queries, query_image_index, query_token_mask, bool(identity), text_padding


def select_best_boxes(pred_logits: torch.Tensor, pred_boxes_cxcywh_norm: torch.Tensor, image_sizes_wh,
                      box_threshold: float) -> BoxPrediction:
    """The decoding rule of upstream's grounding evaluation (eval_grounding.py), batched over queries."""
    num_q = pred_logits.shape[0]
    dtype = at_least_float32(pred_boxes_cxcywh_norm.dtype)
    sizes = torch.as_tensor(image_sizes_wh, dtype=dtype, device=pred_logits.device).reshape(-1, 2)
    if sizes.shape[0] != num_q:
        raise ValueError(f"image_sizes_wh has {sizes.shape[0]} rows for {num_q} queries")
    if not bool((sizes > 0).all()):
        raise ValueError(f"image_sizes_wh must be positive, got {sizes.tolist()}")
    probs = pred_logits.to(dtype).sigmoid().max(dim=-1).values  # [Q, num_queries]; -inf slots -> 0
    scores, best = probs.max(dim=-1)  # first maximal query on ties, like list.index(max(...))
    found = scores > box_threshold
    chosen = pred_boxes_cxcywh_norm.to(dtype)[torch.arange(num_q, device=best.device), best]
    width, height = sizes[:, 0:1], sizes[:, 1:2]
    # Same float32 arithmetic (fp32/bf16/fp16 models) and order as upstream (scale, then x1y1 = c - wh/2,
    # x2y2 = x1y1 + wh) so that truncating to int reproduces its stored boxes exactly.
    scaled = chosen * torch.cat([width, height, width, height], dim=1)
    top_left = scaled[:, :2] - scaled[:, 2:] / 2
    boxes_xyxy_abs = torch.cat([top_left, scaled[:, 2:] + top_left], dim=1)
    fallback_xyxy = torch.tensor(FALLBACK_BOX_XYXY_ABS, dtype=dtype, device=best.device).expand(num_q, 4)
    boxes_xyxy_abs = torch.where(found[:, None], boxes_xyxy_abs, fallback_xyxy)
    fallback_cxcywh = torch.cat([0.5 / width, 0.5 / height, 1.0 / width, 1.0 / height], dim=1)
    boxes_cxcywh_norm = torch.where(found[:, None], chosen, fallback_cxcywh)
    return BoxPrediction(boxes_xyxy_abs=boxes_xyxy_abs, boxes_cxcywh_norm=boxes_cxcywh_norm,
                         scores=torch.where(found, scores, torch.zeros_like(scores)),
                         found=found, query_index=torch.where(found, best, torch.full_like(best, -1)))


def build_vision_branch(config: VisionBranchConfig | str = "swinb_cogcoor") -> VisionBranch:
    """A VisionBranch from a config object, a config name in configs/vision/ or a YAML path."""
    return VisionBranch.from_config(config)
