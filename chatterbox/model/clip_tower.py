"""The CLIP ViT image encoder of the language branch (spec §1.2-1.3), frozen as upstream's.

Unlike upstream (which hides it in a Python list), the tower is a registered sub-module, so ``.to()``
and dtype changes move it with the model. Frozen (``ClipConfig.freeze``, the default), its parameters
never require grad, it always runs in eval mode under ``no_grad``, and the trainable export skips it
(it is a base weight, referenced by path). Unfrozen (a CLIP with random weights, the tiny preset), it
trains with the rest of the model.

Taps: ``hidden_states[image_feature_layer]`` (default -2) without CLS -> the 256 image tokens of the
LLM; ``hidden_states[i]`` for ``region_feature_layers`` (default -11,-8,-5,-2 = ViT blocks 14/17/20/23)
-> the region encoder's four levels.
"""
from __future__ import annotations

from dataclasses import dataclass

import contextlib

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from chatterbox.model.config import ClipConfig


@dataclass
class ClipFeatures:
    image_tokens: torch.Tensor  # [I, num_patches, clip_hidden]
    region_levels: list[torch.Tensor]  # per region level, [I, num_patches, clip_hidden], shallow -> deep


def clip_vision_config(cfg: ClipConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
        hidden_act="quick_gelu",
    )


class ClipTower(nn.Module):
    def __init__(self, cfg: ClipConfig, vision_model: CLIPVisionModel | None = None):
        super().__init__()
        self.cfg = cfg
        num_states = cfg.num_hidden_layers + 1
        for index in [cfg.image_feature_layer, *cfg.region_feature_layers]:
            if not -num_states <= index < num_states:
                raise ValueError(f"CLIP layer index {index} out of range for {cfg.num_hidden_layers} layers")
        self.vision_model = vision_model if vision_model is not None else CLIPVisionModel(clip_vision_config(cfg))
        self.vision_model.requires_grad_(not cfg.freeze)
        self.vision_model.train(not cfg.freeze)
        # Computes tapped_states in its place when set (a frozen tower only; chatterbox.accel replays it from
        # CUDA graphs).
        self.frozen_runner = None

    @property
    def num_patches(self) -> int:
        return (self.cfg.image_size // self.cfg.patch_size) ** 2

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def train(self, mode: bool = True) -> "ClipTower":
        super().train(mode)
        if self.cfg.freeze:
            self.vision_model.eval()  # frozen: never in train mode
        return self

    def forward(self, images: torch.Tensor) -> ClipFeatures:
        """images [I,3,S,S] CLIP-normalised -> image tokens and region levels (CLS dropped)."""
        size = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"CLIP images must be [I,3,{size},{size}], got {tuple(images.shape)}")
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        images = images.to(dtype)
        with torch.no_grad() if self.cfg.freeze else contextlib.nullcontext():
            taps = self.frozen_runner(images) if self.frozen_runner is not None else self.tapped_states(images)
        return ClipFeatures(image_tokens=taps[0], region_levels=list(taps[1:]))

    def tapped_states(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[image tokens, *region levels], CLS dropped; contiguous, so that whatever runs the tower hands the
        same layout to the layers after it (whose kernels may depend on it)."""
        states = self.vision_model(pixel_values=images, output_hidden_states=True).hidden_states
        return [states[i][:, 1:].contiguous() for i in (self.cfg.image_feature_layer, *self.cfg.region_feature_layers)]
