"""ChatterBox: the composition users import (``from chatterbox import ChatterBox``), spec §1.

    model = ChatterBox.build(cfg.model, dtype=torch.bfloat16)      # base weights from paths / Hub ids / random
    out = model(**batch)                                            # dict(lm_loss, grounding_loss, loss, ...)
    results = model.generate(input_ids, attention_mask, images_clip=..., images_dino=..., image_sizes_hw=...)
    model.save_pretrained("export/"); model = ChatterBox.from_pretrained("export/")  # or "owner/name[@revision]"

Sub-modules: ``clip_tower`` (frozen CLIP ViT), ``language_model`` (LLaVA LLaMA, peft LoRA-wrapped),
``region_encoder`` (`<bbox>` vectors), ``query_head`` (`[VG]` queries), ``vision_branch`` (GroundingDINO)
and ``grounding_criterion``. The batch layout is the collate's (docs/model.md).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.conversation import IGNORE_INDEX
from chatterbox.model.clip_tower import ClipFeatures, ClipTower
from chatterbox.model.decoding import DecodeOptions, KVDecoder, RecomputeDecoder, decode, make_kv_decoder
from chatterbox.model.config import ModelConfig
from chatterbox.model.llava_llama import (LlavaLlamaForCausalLM, check_image_layout, inject_region_features,
                                          splice_image_features)
from chatterbox.model.lora import apply_trainable_policy, parameter_table
from chatterbox.model.query_head import QueryHead, positions_before_token
from chatterbox.model.region_encoder import RegionEncoder
from chatterbox.precision import at_least_float32
from chatterbox.tokens import SpecialTokenIds, special_token_ids
from model.GroundingDINO import GroundingCriterion, VisionBranch

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One generated reply. Boxes have one row per `[VG]` (prompt ones first, then generated ones)."""

    token_ids: list[int]
    text: str
    boxes_xyxy_abs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))  # original-image pixels
    boxes_cxcywh_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    vg_in_prompt: int = 0  # how many of the boxes answer a `[VG]` of the prompt


def _where(sample_ids: Sequence[str] | None, row: int) -> str:
    return f"sample {sample_ids[row]!r} (batch row {row})" if sample_ids is not None else f"batch row {row}"


def causal_mask_suffices(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when ``attention_mask`` only marks right padding, else the mask itself.

    With right padding no real token ever sees a padding position under the causal mask, so the
    padding mask changes nothing for real tokens (positions are 0..T-1 either way); dropping it lets
    SDPA run its causal flash kernel instead of the masked one. Outputs at padding positions differ,
    but they are never supervised nor read as `[VG]` queries.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1, keepdim=True)
    right_padded = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths
    return None if bool((right_padded == mask).all()) else attention_mask


class ChatterBox(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer, language_model: nn.Module, clip_tower: ClipTower,
                 vision_branch: VisionBranch):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.quantization = "none"  # "8bit" / "4bit" after chatterbox.model.quantization (inference only)
        #: How generate and chat sessions run their decode steps (speed only: every choice gives the same tokens).
        self.decode_options = DecodeOptions()
        self.token_ids: SpecialTokenIds = special_token_ids(tokenizer)
        self.clip_tower = clip_tower
        self.language_model = language_model
        hidden = self.causal_lm.config.hidden_size
        if self.causal_lm.config.mm_hidden_size != clip_tower.hidden_size:
            raise ValueError(f"mm_projector expects {self.causal_lm.config.mm_hidden_size}-d CLIP features, "
                             f"the CLIP tower gives {clip_tower.hidden_size}")
        self.region_encoder = RegionEncoder(cfg.region_encoder, clip_tower.hidden_size, cfg.clip.image_size, hidden)
        if cfg.query_head.out_dim != vision_branch.cfg.hidden_dim:
            raise ValueError(f"query_head.out_dim={cfg.query_head.out_dim} must equal the vision branch "
                             f"hidden_dim={vision_branch.cfg.hidden_dim}")
        self.query_head = QueryHead(cfg.query_head, hidden)
        self.vision_branch = vision_branch
        self.grounding_criterion = GroundingCriterion(vision_branch.cfg)
        # Computes the grounding loss from the backbone features in place of the eager vision branch + criterion
        # when set, or declines (None) (chatterbox.accel: replayed from CUDA graphs).
        self.grounding_loss_runner = None
        if cfg.keep_unused_upstream_heads:
            # Dead in upstream too (spec §1.4); present only so its checkpoints round-trip.
            self.tgt_align = nn.Linear(cfg.query_head.out_dim, cfg.query_head.out_dim)
            self.refpoint_align = nn.Linear(cfg.query_head.out_dim, 4)
        apply_trainable_policy(self, train_vision_backbone=not vision_branch.cfg.freeze_backbone,
                               train_clip=not cfg.clip.freeze, train_llm_base=not cfg.language.freeze_base)

    # ------------------------------------------------------------------------------------------------
    # construction
    @classmethod
    def build(cls, cfg: ModelConfig, tokenizer=None, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None, verbose: bool = True,
              quantization: str = "none") -> "ChatterBox":
        """Build from a config: base weights from the configured paths or Hub ids, random where a path is empty.
        ``quantization`` ("8bit", "4bit"): the LLM's linear layers in bitsandbytes, for inference
        (chatterbox.model.quantization)."""
        from chatterbox.model import weights

        model = weights.build_model(cfg, tokenizer=tokenizer)
        model._place(dtype, device, quantization)
        if verbose:
            logger.info("ChatterBox parameters:\n%s", model.parameter_table())
        return model

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, quantization: str = "none") -> "ChatterBox":
        """Load an export written by :meth:`save_pretrained` (base weights re-read from their paths).

        ``directory`` may be the Hub id of a repo holding an export: ``owner/name`` or ``owner/name@revision``.
        ``quantization`` ("8bit", "4bit"): the LLM's linear layers in bitsandbytes, for inference on a smaller
        card (chatterbox.model.quantization).
        """
        from chatterbox.model import weights

        model = weights.load_pretrained(directory)
        model._place(dtype, device, quantization)
        return model

    def _place(self, dtype: torch.dtype | None, device: str | torch.device | None, quantization: str) -> None:
        if quantization == "none":
            if dtype is not None or device is not None:
                self.to(device=device, dtype=dtype)
            return
        from chatterbox.model.quantization import quantize_language_model

        if dtype is not None:
            self.to(dtype=dtype)  # on the host: bitsandbytes quantises while moving to the device
        quantize_language_model(self, quantization, device if device is not None else "cpu")

    def save_pretrained(self, directory: str | Path, merge_lora: bool = False,
                        max_shard_size: int | str = "5GB") -> Path:
        """Write config + tokenizer + trainable weights (safetensors) + references to the base weights + a
        model card, in the Hub layout: ``hf upload owner/name <directory>`` publishes it.

        ``merge_lora=True`` writes a self-contained export instead: LoRA folded into the LLM weights and
        every weight (except a frozen CLIP that comes from a path) saved. Weights above ``max_shard_size``
        are split into shards listed in model.safetensors.index.json.
        """
        from chatterbox.model import weights

        return weights.save_pretrained(self, directory, merge_lora=merge_lora, max_shard_size=max_shard_size)

    @property
    def causal_lm(self) -> LlavaLlamaForCausalLM:
        """The LlavaLlamaForCausalLM inside the peft wrapper (LoRA layers are injected in place)."""
        lm = self.language_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    def parameter_table(self) -> str:
        return parameter_table(self)

    # ------------------------------------------------------------------------------------------------
    # memory / precision
    def set_gradient_checkpointing(self, num_layers: int = -1) -> int:
        """Recompute the activations of the first ``num_layers`` LLM decoder layers in backward.

        -1 = every layer, 0 = none. Short micro-batches fit without it (and run ~1/3 faster: the
        frozen weights make backward only 2x the forward, so a recompute adds half); long ones
        checkpoint only as many layers as memory needs. Can be changed between micro-batches.
        Returns the number of checkpointed layers.
        """
        layers = self.causal_lm.model.layers
        count = len(layers) if num_layers < 0 else num_layers
        if count > len(layers):
            raise ValueError(f"gradient checkpointing of {count} layers: the LLM has only {len(layers)}")
        if count and not getattr(layers[0], "_gradient_checkpointing_func", None):
            # Installs the (non-reentrant) checkpoint function on every layer and turns all of them on.
            self.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < count
        return count

    @property
    def gradient_checkpointing_layers(self) -> int:
        return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in self.causal_lm.model.layers)

    def _apply(self, fn, recurse: bool = True):
        """Every ``.to()``/``.half()``/``.bfloat16()`` (DeepSpeed's too) ends here: keep RoPE in fp32.

        transformers keeps the rotary inverse frequencies as a floating buffer, so a cast to bf16 would
        round them (0.3162 -> 0.3164) and shift every rotation angle by up to ~0.1 rad at position
        600 — a different positional code than LLaMA was trained with. They are recomputed in fp32.
        """
        super()._apply(fn, recurse)
        for module in self.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if (isinstance(inv_freq, torch.Tensor) and not inv_freq.is_meta and inv_freq.dtype != torch.float32
                    and hasattr(module, "rope_type") and hasattr(module, "config")):
                fresh = type(module)(config=module.config)
                for name in ("inv_freq", "original_inv_freq"):
                    if isinstance(getattr(module, name, None), torch.Tensor):
                        setattr(module, name, getattr(fresh, name).to(inv_freq.device))
        return self

    def print_trainable_parameters(self) -> None:
        print(self.parameter_table())

    def chat_session(self, image, **kwargs):
        """A multi-round chat about ``image`` (path, bytes or PIL image) that keeps its KV cache across rounds.

        ``reply = chat.ask("What is <bbox> holding?", boxes=[[x1, y1, x2, y2]])`` — see docs/chat.md.
        """
        from chatterbox.serve.session import ChatSession

        return ChatSession(self, image, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # inputs
    @staticmethod
    def _row_to_image(offset: torch.Tensor | None, num_rows: int, num_images: int) -> torch.Tensor:
        if offset is None:
            if num_images != num_rows:
                raise ValueError(f"{num_images} images for {num_rows} rows: pass `offset`")
            return torch.arange(num_rows)
        offset = torch.as_tensor(offset).cpu().long()
        if (offset.dim() != 1 or offset.numel() != num_images + 1 or int(offset[0]) != 0
                or int(offset[-1]) != num_rows or bool((offset[1:] < offset[:-1]).any())):
            raise ValueError(f"offset {offset.tolist()} is not a non-decreasing [0..{num_rows}] vector of "
                             f"{num_images + 1} entries")
        return torch.repeat_interleave(torch.arange(num_images), offset[1:] - offset[:-1])

    def build_inputs_embeds(self, input_ids: torch.Tensor, images_clip: torch.Tensor | None = None,
                            offset: torch.Tensor | None = None, region_boxes_xyxy_clip_norm: Sequence | None = None,
                            sample_ids: Sequence[str] | None = None,
                            host_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features at `<im_patch>` and region vectors at `<bbox>` positions.

        The token layout is checked on a host copy of ``input_ids`` (``host_input_ids`` if given, else one
        device->host copy)."""
        ids = self.token_ids
        embed = self.causal_lm.get_input_embeddings()
        inputs_embeds = embed(input_ids)
        host_ids = input_ids.cpu() if host_input_ids is None else host_input_ids
        images_per_row = check_image_layout(host_ids, ids, self.clip_tower.num_patches, sample_ids)
        bbox_counts = (host_ids == ids.bbox).sum(dim=1).tolist()
        if region_boxes_xyxy_clip_norm is not None and len(region_boxes_xyxy_clip_norm) != input_ids.shape[0]:
            raise ValueError(f"region_boxes_xyxy_clip_norm has {len(region_boxes_xyxy_clip_norm)} entries for "
                             f"{input_ids.shape[0]} rows")
        for row, count in enumerate(bbox_counts):
            boxes = None if region_boxes_xyxy_clip_norm is None else region_boxes_xyxy_clip_norm[row]
            given = 0 if boxes is None else int(len(boxes))
            if count != given:
                raise ValueError(f"{_where(sample_ids, row)}: {count} <bbox> tokens but {given} region boxes")
        if images_clip is None:
            if int(images_per_row.sum()) or sum(bbox_counts):
                raise ValueError("the prompt has image or <bbox> tokens but no images_clip were given")
            return inputs_embeds
        row_to_image = self._row_to_image(offset, input_ids.shape[0], images_clip.shape[0])
        rows_with_image = images_per_row.nonzero(as_tuple=True)[0]
        needs_regions = sum(bbox_counts) > 0
        if rows_with_image.numel() == 0 and not needs_regions:
            return inputs_embeds
        features = self.clip_tower(images_clip)
        if rows_with_image.numel():
            projector = self.causal_lm.model.mm_projector
            image_embeds = projector(features.image_tokens.to(projector.weight.dtype))
            image_embeds = image_embeds[row_to_image[rows_with_image].to(image_embeds.device, non_blocking=True)]
            inputs_embeds = splice_image_features(inputs_embeds, input_ids, ids.im_patch, image_embeds,
                                                  int(images_per_row.sum()) * self.clip_tower.num_patches)
        if needs_regions:
            region_vectors = self._region_vectors(features, region_boxes_xyxy_clip_norm, row_to_image)
            inputs_embeds = inject_region_features(inputs_embeds, input_ids, ids.bbox, region_vectors, sum(bbox_counts))
        return inputs_embeds

    def _region_vectors(self, features: ClipFeatures, regions_xyxy_clip_norm: Sequence, row_to_image: torch.Tensor):
        rows = [r for r, boxes in enumerate(regions_xyxy_clip_norm) if boxes is not None and len(boxes)]
        boxes = torch.cat([torch.as_tensor(regions_xyxy_clip_norm[r]).reshape(-1, 4) for r in rows])
        box_rows = torch.cat([torch.full((len(regions_xyxy_clip_norm[r]),), r) for r in rows])
        box_images = row_to_image[box_rows]
        used_images, box_image_index = torch.unique(box_images, return_inverse=True)
        device = features.image_tokens.device
        # Host index tensors go over without a synchronising copy.
        used_images, box_image_index = (t.to(device, non_blocking=True) for t in (used_images, box_image_index))
        levels = [level.index_select(0, used_images) for level in features.region_levels]
        return self.region_encoder(levels, boxes.to(device, non_blocking=True), box_image_index)

    # ------------------------------------------------------------------------------------------------
    # training forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, images_clip: torch.Tensor | None = None,
                images_dino: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                image_sizes_hw: torch.Tensor | None = None, region_boxes_xyxy_clip_norm: Sequence | None = None,
                grounding_targets_cxcywh_norm: Sequence | None = None, task: Sequence[str] | None = None,
                sample_ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Training/validation forward on a collated batch (docs/model.md "batch contract").

        Returns ``lm_loss``, ``grounding_loss``, ``loss = lm_loss + grounding_loss`` (spec §2.6) and every
        named grounding term (``loss_ce``, ``loss_bbox_0``, ...; detached, for logging). With
        ``cfg.zero_lm_loss_on_grounding`` the LM loss of a batch with grounding targets is multiplied by 0.
        """
        host_ids, hidden = self._llm_hidden_states(input_ids, attention_mask, images_clip, offset,
                                                   region_boxes_xyxy_clip_norm, sample_ids)
        result: dict[str, torch.Tensor] = {}
        if self.lm_loss_is_zeroed(grounding_targets_cxcywh_norm):
            # Upstream multiplies this batch's LM loss by 0: its gradient is zero, so lm_head and the
            # cross-entropy over the vocabulary are not computed at all (a zero gradient and no gradient
            # are the same to the ZeRO optimizer, which fills missing gradients with zeros).
            lm_loss = torch.zeros((), dtype=at_least_float32(hidden.dtype), device=hidden.device)
        else:
            lm_loss = self._lm_loss(hidden, labels) if labels is not None else hidden.sum() * 0.0

        grounding = self._grounding_losses(hidden, input_ids, host_ids, images_dino, offset,
                                           grounding_targets_cxcywh_norm, sample_ids)
        grounding_loss = grounding.pop("loss")
        result["lm_loss"] = lm_loss
        result["grounding_loss"] = grounding_loss
        result["loss"] = lm_loss + grounding_loss.to(lm_loss.dtype)
        result.update({name: value.detach() for name, value in grounding.items()})
        return result

    def grounding_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          images_clip: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                          region_boxes_xyxy_clip_norm: Sequence | None = None,
                          sample_ids: Sequence[str] | None = None, **_batch) -> torch.Tensor:
        """[Q, D]: the query of every `[VG]` of a collated batch, row by row in order (the query head on the
        LLM's hidden state before it), without the vision branch."""
        host_ids, hidden = self._llm_hidden_states(input_ids, attention_mask, images_clip, offset,
                                                   region_boxes_xyxy_clip_norm, sample_ids)
        counts = (host_ids[:, 1:] == self.token_ids.vg).sum(dim=1).tolist()  # as _grounding_targets
        rows = [row for row, n in enumerate(counts) for _ in range(n)]
        slots = [slot for n in counts for slot in range(n)]
        return self.query_head(self._hidden_before_vg(hidden, input_ids, rows, slots))

    def _llm_hidden_states(self, input_ids, attention_mask, images_clip, offset, region_boxes_xyxy_clip_norm,
                           sample_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(host copy of the ids, the LLM's last hidden states) of a collated batch, images and regions injected."""
        host_ids = input_ids.cpu()  # the token layout is checked on the host, before anything is queued
        inputs_embeds = self.build_inputs_embeds(input_ids, images_clip, offset, region_boxes_xyxy_clip_norm,
                                                 sample_ids, host_ids)
        hidden = self.causal_lm.model(inputs_embeds=inputs_embeds, attention_mask=causal_mask_suffices(attention_mask),
                                      use_cache=False).last_hidden_state
        return host_ids, hidden

    def lm_loss_is_zeroed(self, grounding_targets_cxcywh_norm: Sequence | None) -> bool:
        """Upstream's rule: a batch with any grounding target trains without its LM loss (spec §1.9)."""
        return self.cfg.zero_lm_loss_on_grounding and any(grounding_targets_cxcywh_norm or [])

    def _lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Shifted token cross-entropy, mean over supervised (!= IGNORE_INDEX) targets, in at least fp32; 0 (with a
        graph) when nothing is supervised. Sum / count rather than a test of the labels, which would make the
        host wait for the LLM's forward before it can queue the vision branch."""
        logits = self.causal_lm.lm_head(hidden[:, :-1])
        targets = labels[:, 1:].to(logits.device)
        logits = logits.to(at_least_float32(logits.dtype))
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def _grounding_losses(self, hidden, input_ids, host_ids, images_dino, offset, grounding_targets_cxcywh_norm,
                          sample_ids) -> dict:
        """The grounding loss (spec §1.5-1.6): the hidden state before each `[VG]` becomes a query (query
        head), the vision branch predicts boxes for it on its row's image, and the criterion matches them
        with that `[VG]`'s target boxes (focal loss on the scores, L1 + GIoU on the matched boxes)."""
        query_rows, query_slots, target_boxes = self._grounding_targets(input_ids, host_ids,
                                                                        grounding_targets_cxcywh_norm, sample_ids)
        outputs = None
        if target_boxes:
            if images_dino is None:
                raise ValueError("the batch has grounding targets but no images_dino")
            queries = self.query_head(self._hidden_before_vg(hidden, input_ids, query_rows, query_slots))
            # The images the queries ground in, and each query's index among them (host tensors).
            row_to_image = self._row_to_image(offset, input_ids.shape[0], images_dino.shape[0])
            used_images, query_image_index = torch.unique(row_to_image[torch.tensor(query_rows)], return_inverse=True)
            if used_images.tolist() != list(range(images_dino.shape[0])):
                images_dino = images_dino.index_select(0, used_images.to(images_dino.device, non_blocking=True))
            vision_dtype = next(self.vision_branch.input_proj.parameters()).dtype
            features = self.vision_branch.forward_backbone(images_dino.to(vision_dtype))
            queries = queries.to(vision_dtype)
            runner = self.grounding_loss_runner
            losses = runner(features, queries, query_image_index, target_boxes) if runner is not None else None
            if losses is not None:
                return losses
            outputs = self.vision_branch.forward_enc_dec(features, queries, query_image_index)
        box_dtype = at_least_float32(hidden.dtype)
        target_boxes = [b.to(hidden.device, box_dtype, non_blocking=True) for b in target_boxes]
        # Called on every batch so that its cross-rank collective never desynchronises (spec §5.2.23).
        return self.grounding_criterion(outputs, target_boxes, device=hidden.device)

    def _grounding_targets(self, input_ids, host_ids, grounding_targets_cxcywh_norm, sample_ids):
        """The batch's grounding targets as (row, `[VG]` rank in the row, boxes [k,4]) per query, checked:
        a row must have one `[VG]` per target (counted on the host copy of the ids)."""
        num_rows = input_ids.shape[0]
        query_rows, query_slots, target_boxes = [], [], []
        if grounding_targets_cxcywh_norm is None:
            return query_rows, query_slots, target_boxes
        if len(grounding_targets_cxcywh_norm) != num_rows:
            raise ValueError(f"grounding_targets_cxcywh_norm has {len(grounding_targets_cxcywh_norm)} entries for "
                             f"{num_rows} rows")
        found = (host_ids[:, 1:] == self.token_ids.vg).sum(dim=1).tolist()  # as positions_before_token
        for row, targets in enumerate(grounding_targets_cxcywh_norm):
            if not targets:
                continue
            if found[row] != len(targets):
                raise ValueError(f"{_where(sample_ids, row)}: {found[row]} [VG] tokens but {len(targets)} "
                                 f"grounding targets")
            for slot, boxes in enumerate(targets):
                boxes = torch.as_tensor(boxes)
                if boxes.dim() != 2 or boxes.shape[-1] != 4 or boxes.shape[0] < 1:
                    raise ValueError(f"{_where(sample_ids, row)}: grounding target must be [k>=1,4] "
                                     f"cxcywh normalised, got {tuple(boxes.shape)}")
                query_rows.append(row)
                query_slots.append(slot)
                target_boxes.append(boxes)
        return query_rows, query_slots, target_boxes

    def _hidden_before_vg(self, hidden, input_ids, query_rows: list[int], query_slots: list[int]) -> torch.Tensor:
        """[Q, H]: for each query, the hidden state of the token before its row's ``slot``-th `[VG]`, found
        on the device (no wait for the LLM's forward)."""
        before_vg = torch.zeros_like(input_ids, dtype=torch.bool)
        before_vg[:, :-1] = input_ids[:, 1:] == self.token_ids.vg
        rows_slots = torch.tensor([query_rows, query_slots]).to(input_ids.device, non_blocking=True)
        rows, slots = rows_slots[0], rows_slots[1]
        candidates = before_vg[rows]  # [Q, L]: the position whose rank in its row is slot + 1
        cols = ((candidates.cumsum(dim=1) == slots[:, None] + 1) & candidates).int().argmax(dim=1)
        return hidden[rows.to(hidden.device), cols.to(hidden.device)]

    # ------------------------------------------------------------------------------------------------
    # generation
    def _next_token_logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        logits = self.causal_lm.lm_head(hidden_last)
        logits = logits.to(at_least_float32(logits.dtype))
        # Image/region placeholders need external inputs and are never generated.
        logits.index_fill_(-1, self._banned_token_index(logits.device), float("-inf"))
        return logits

    def _banned_token_index(self, device: torch.device) -> torch.Tensor:
        """The placeholder ids as a tensor on ``device``, made once (a per-step host list would copy each step)."""
        cached = getattr(self, "_banned_index_cache", None)
        if cached is None or cached.device != device:
            ids = self.token_ids
            cached = torch.tensor([ids.im_patch, ids.im_start, ids.im_end, ids.bbox], device=device)
            self._banned_index_cache = cached
        return cached

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              generator: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def make_decoder(self, batch_size: int, capacity: int) -> KVDecoder:
        """A KV decoder of ``capacity`` columns over this model's LLM (chatterbox.model.decoding), its decode
        steps run as :attr:`decode_options` say (by default the fused step, compiled and replayed from CUDA
        graphs on CUDA)."""
        param = self.causal_lm.get_input_embeddings().weight
        options = self.decode_options
        if self.quantization != "none" and options.cuda_graph is None:
            # bitsandbytes' int8 matmul picks its outlier columns on the host: not capturable
            options = dataclasses.replace(options, cuda_graph=False)
        return make_kv_decoder(self.causal_lm, batch_size, capacity, param.device, param.dtype, options)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 images_clip: torch.Tensor | None = None, images_dino: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, image_sizes_hw: torch.Tensor | None = None,
                 region_boxes_xyxy_clip_norm: Sequence | None = None, sample_ids: Sequence[str] | None = None,
                 max_new_tokens: int = 512, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True,
                 box_threshold: float | None = None, generator: torch.Generator | None = None
                 ) -> list[GenerationResult]:
        """Generate replies for right-padded prompts; boxes for every `[VG]` in prompt or reply.

        Regions are injected in the prefill; the query of a prompt `[VG]` is read from the prefill hidden
        states, that of a generated `[VG]` from the hidden state of the step that produced it. Decoding
        runs through chatterbox.model.decoding: a static KV cache of prompt + ``max_new_tokens`` columns
        (:meth:`make_decoder`); ``use_cache=False`` re-runs the whole sequence every step (for testing
        equivalence).
        ``image_sizes_hw`` [I,2] (height, width) of the original images map boxes to pixels.
        End-of-sequence is suppressed for the first ``min_new_tokens`` tokens (as in transformers).
        """
        self.eval()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(dim=1)
        embeds = self.build_inputs_embeds(input_ids, images_clip, offset, region_boxes_xyxy_clip_norm, sample_ids)
        # Right padding -> left padding so that new tokens append at one column for every row.
        shift = (length - lengths).to(device)
        source = (torch.arange(length, device=device)[None, :] - shift[:, None]) % length
        embeds = embeds.gather(1, source[:, :, None].expand_as(embeds))
        mask = attention_mask.gather(1, source).to(device)

        # The last picked token is never fed back: prompt + max_new_tokens - 1 columns at most.
        decoder = self.make_decoder(batch, length + max_new_tokens) if use_cache \
            else RecomputeDecoder(self.causal_lm, batch, device)
        hidden = decoder.prefill(embeds, mask)

        # Queries of the prompt's [VG] tokens: hidden state of the preceding token (left-padded column).
        vg_rows, vg_cols = positions_before_token(input_ids, self.token_ids.vg)
        query_hidden: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        for r, c in zip(vg_rows.tolist(), vg_cols.tolist()):
            query_hidden[r].append(hidden[r, c + int(shift[r])])
        vg_in_prompt = [len(q) for q in query_hidden]

        decoded = decode(self, decoder, hidden[:, -1], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)
        results = []
        for r in range(batch):
            query_hidden[r].extend(decoded.vg_hidden[r])
            tokens = decoded.token_ids[r]
            results.append(GenerationResult(token_ids=tokens, text=self.tokenizer.decode(tokens),
                                            vg_in_prompt=vg_in_prompt[r]))
        self._attach_boxes(results, query_hidden, images_dino, offset, image_sizes_hw, box_threshold)
        return results

    def image_features(self, images_dino: torch.Tensor):
        """The vision branch's backbone features of ``images_dino`` [I,3,H,W] (reusable across questions)."""
        vision_dtype = next(self.vision_branch.input_proj.parameters()).dtype
        return self.vision_branch.forward_backbone(images_dino.to(vision_dtype))

    def boxes_for_queries(self, query_hidden: torch.Tensor, image_features, query_image_index: torch.Tensor,
                          image_sizes_wh: torch.Tensor, box_threshold: float | None = None):
        """The best box of each `[VG]` query: ``query_hidden`` [Q,hidden] (the LLM states the queries are read
        from) through the query head and the vision branch on the ``image_features`` of image
        ``query_image_index[q]``; boxes in pixels of images of ``image_sizes_wh`` [Q,2] (BoxPrediction)."""
        queries = self.query_head(query_hidden)
        vision_dtype = next(self.vision_branch.input_proj.parameters()).dtype
        outputs = self.vision_branch.forward_enc_dec(image_features, queries.to(vision_dtype),
                                                     query_image_index.to(queries.device))
        return self.vision_branch.predict_boxes(outputs, image_sizes_wh, box_threshold)

    def _attach_boxes(self, results, query_hidden, images_dino, offset, image_sizes_hw, box_threshold) -> None:
        query_rows = [r for r, qs in enumerate(query_hidden) for _ in qs]
        if not query_rows:
            return
        if images_dino is None or image_sizes_hw is None:
            raise ValueError("the prompt or reply has [VG] tokens: pass images_dino and image_sizes_hw to get boxes")
        row_to_image = self._row_to_image(offset, len(results), images_dino.shape[0])
        query_images = row_to_image[torch.tensor(query_rows)]
        used_images, query_image_index = torch.unique(query_images, return_inverse=True)
        features = self.image_features(images_dino.index_select(0, used_images.to(images_dino.device)))
        sizes_hw = torch.as_tensor(image_sizes_hw).reshape(-1, 2)[query_images]
        best = self.boxes_for_queries(torch.stack([h for qs in query_hidden for h in qs]), features,
                                      query_image_index, sizes_hw.flip(-1), box_threshold)
        start = 0
        for r, qs in enumerate(query_hidden):
            end = start + len(qs)
            results[r].boxes_xyxy_abs = best.boxes_xyxy_abs[start:end].cpu()
            results[r].boxes_cxcywh_norm = best.boxes_cxcywh_norm[start:end].cpu()
            results[r].scores = best.scores[start:end].cpu()
            start = end
