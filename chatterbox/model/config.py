"""Configs of the language side: LLaVA-LLaMA, CLIP tower, region encoder, query head, LoRA.

Defaults are the paper's 13B model (spec/upstream.md §1). Paths are empty by default: an empty path
means "build with random weights from the architecture fields" (tiny preset, tests, benchmarks). A
path that does not exist locally may be a Hub id, ``owner/name[@revision][:path/in/repo]``
(chatterbox/model/hub.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.GroundingDINO.config import VisionBranchConfig


#: The rows of the trainable-parameter table (chatterbox.model.lora.parameter_group), also the keys of
#: train.lr_scale.
PARAMETER_GROUPS = ("clip_tower", "embed_tokens", "llm_base", "lora", "mm_projector", "lm_head", "region_encoder",
                    "query_head", "vision_backbone", "vision_branch")


@dataclass
class LanguageConfig:
    llm_path: str = ""  # HF folder or Hub id of liuhaotian/llava-llama-2-13b-chat-lightning-preview (or 7b)
    tokenizer_path: str = ""  # defaults to llm_path when empty
    model_max_length: int = 2048
    # Architecture used when llm_path is empty (LLaMA-2-13B).
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int = 40
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = True
    # How many decoder layers (the first ones) recompute their activations in backward when
    # gradient_checkpointing is on; -1 = all. Fewer layers = less recompute, more activation memory.
    gradient_checkpointing_layers: int = -1
    # LoRA on the LLM (upstream: r 16, alpha 16, dropout 0.05 on q_proj and v_proj).
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Upstream freezes the pretrained LLaMA weights (and mm_projector, norms) and trains LoRA, embed_tokens
    # and lm_head. False also trains them: for an LLM with random weights (the tiny preset), where
    # freezing keeps nothing that was learned.
    freeze_base: bool = True


@dataclass
class ClipConfig:
    clip_path: str = ""  # HF folder or Hub id of openai/clip-vit-large-patch14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    # hidden_states index feeding the LLM (LLaVA's mm_vision_select_layer).
    image_feature_layer: int = -2
    # hidden_states indices feeding the region encoder, shallow -> deep (ViT blocks 14/17/20/23).
    region_feature_layers: list[int] = field(default_factory=lambda: [-11, -8, -5, -2])
    # Upstream keeps the pretrained CLIP frozen (run under no_grad). False trains it with the rest: for a
    # CLIP with random weights (the tiny preset), whose frozen features would be random projections.
    freeze: bool = True
    # How an image becomes the CLIP square. "per_source": upstream's, the HF CLIPImageProcessor's centre
    # crop (shortest side -> image_size) for every source except COCO detection, which is squashed.
    # "squash": every image squashed to the square in training, evaluation and chat, so nothing is cut
    # off: for scenes whose objects reach the image borders (the synthetic corpus), where a crop would
    # hide the region a question is about.
    resize: Literal["per_source", "squash"] = "per_source"


@dataclass
class RegionEncoderConfig:
    embed_dims: int = 1024
    num_levels: int = 4
    num_fuse_rounds: int = 5
    fuse_group_norm_groups: int = 64
    level_sizes: list[int] = field(default_factory=lambda: [128, 64, 32, 16])
    roi_output_size: int = 14
    roi_sampling_ratio: int = 2
    pos_embed_dims: int = 256
    # Width of the RoI feature after flatten_linear and of the box positional MLP (upstream: 1024,
    # independent of the CLIP width); projected to the LLM width afterwards.
    roi_feature_dims: int = 1024


@dataclass
class QueryHeadConfig:
    out_dim: int = 256
    dropout: float = 0.0


@dataclass
class ModelConfig:
    language: LanguageConfig = field(default_factory=LanguageConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    region_encoder: RegionEncoderConfig = field(default_factory=RegionEncoderConfig)
    query_head: QueryHeadConfig = field(default_factory=QueryHeadConfig)
    vision: VisionBranchConfig = field(default_factory=VisionBranchConfig)
    # groundingdino_swinb_cogcoor.pth, or its Hub id ShilongLiu/GroundingDINO:groundingdino_swinb_cogcoor.pth;
    # empty = random init
    vision_weights: str = ""
    # Upstream multiplies the LM loss of a micro-batch by 0 when any sample has a GT box (spec §1.9).
    zero_lm_loss_on_grounding: bool = True
    # Upstream builds tgt_align / refpoint_align but never uses them; kept only to import its checkpoints.
    keep_unused_upstream_heads: bool = False
