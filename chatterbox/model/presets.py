"""Model-size presets (language side + vision branch) and parameter counting on the meta device.

* ``tiny``: the model of configs/tiny_stage1.yaml (random init, CPU forward+backward of a batch in
  seconds: the quickstart, tests, CI);
* ``7b``: LLaVA-LLaMA-2-7B + CLIP-L + Swin-B;
* ``13b``: the paper — LLaVA-LLaMA-2-13B + CLIP-L/14 + GroundingDINO Swin-B (the ModelConfig defaults).

``count_parameters(preset("13b"))`` instantiates every part on the meta device (no memory) and must
reproduce spec/checkpoints/README.md.
"""
from __future__ import annotations

import torch

from chatterbox.model.config import LanguageConfig, ModelConfig

PRESETS = ("tiny", "7b", "13b")


def preset(name: str) -> ModelConfig:
    if name == "13b":
        return ModelConfig()
    if name == "7b":
        return ModelConfig(language=LanguageConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                   num_attention_heads=32, num_key_value_heads=32))
    if name == "tiny":
        from chatterbox.config import load_config

        return load_config("tiny_stage1").model  # the quickstart's tiny model
    raise ValueError(f"unknown model preset {name!r}; known: {list(PRESETS)}")


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameters of each part, built on the meta device. The LLM is counted before the
    vocabulary resize (checkpoint layout, mm_projector included)."""
    from model.GroundingDINO import VisionBranch
    from transformers import CLIPVisionModel

    from chatterbox.model.clip_tower import clip_vision_config
    from chatterbox.model.llava_llama import LlavaLlamaForCausalLM, llama_config
    from chatterbox.model.query_head import QueryHead
    from chatterbox.model.region_encoder import RegionEncoder

    def unique(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())  # parameters() already de-duplicates shared ones

    with torch.device("meta"):
        lm = LlavaLlamaForCausalLM(llama_config(cfg.language, mm_hidden_size=cfg.clip.hidden_size))
        hidden = cfg.language.hidden_size
        counts = {
            "llm": unique(lm),
            "mm_projector": unique(lm.model.mm_projector),
            "clip": unique(CLIPVisionModel(clip_vision_config(cfg.clip))),
            "region_encoder": unique(RegionEncoder(cfg.region_encoder, cfg.clip.hidden_size, cfg.clip.image_size,
                                                   hidden)),
            "query_head": unique(QueryHead(cfg.query_head, hidden)),
        }
        vision = VisionBranch(cfg.vision)
        counts["vision_branch"] = unique(vision)
        counts["vision_backbone"] = unique(vision.backbone)
    return counts
