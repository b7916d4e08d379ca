"""LoRA on the LLM (peft) and the trainable-parameter policy of spec §1.8.

Trainable: LoRA A/B, the full ``embed_tokens`` and ``lm_head`` (the added tokens need new rows),
the region encoder, the query head and the vision branch except its Swin backbone (which upstream
runs under no_grad, so it never received gradients there either). Frozen: CLIP, the base LLaMA
weights, ``mm_projector``, the norms. The pretrained parts upstream freezes can be trained instead
(``model.clip.freeze``, ``model.language.freeze_base``, ``model.vision.freeze_backbone``), which is
what a model built with random weights (the tiny preset) needs.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

from torch import nn

from chatterbox.model.config import LanguageConfig


def apply_lora(lm: nn.Module, cfg: LanguageConfig) -> nn.Module:
    """Wrap the causal LM with peft LoRA (``cfg.lora_r == 0`` disables LoRA and returns ``lm``)."""
    if cfg.lora_r <= 0:
        return lm
    # peft imports bitsandbytes where it is installed; on a CPU with AVX512-BF16 its backend warns that an
    # optional kernel from the Hub is missing (it would download it) and falls back to its own.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(lm, lora)


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name


def parameter_group(name: str) -> str:
    """The row of the trainable-parameter table a ChatterBox parameter belongs to."""
    if name.startswith("clip_tower."):
        return "clip_tower"
    if name.startswith("language_model."):
        if is_lora_parameter(name):
            return "lora"
        if name.endswith("embed_tokens.weight"):
            return "embed_tokens"
        if name.endswith("lm_head.weight"):
            return "lm_head"
        if ".mm_projector." in name:
            return "mm_projector"
        return "llm_base"
    if name.startswith("vision_branch.backbone."):
        return "vision_backbone"
    for prefix in ("vision_branch", "region_encoder", "query_head"):
        if name.startswith(prefix + "."):
            return prefix
    return name.split(".", 1)[0]


def apply_trainable_policy(model: nn.Module, train_vision_backbone: bool = False, train_clip: bool = False,
                           train_llm_base: bool = False) -> None:
    """Set requires_grad on every parameter of a ChatterBox: spec §1.8, plus the frozen parts asked for."""
    trainable_groups = {"lora", "embed_tokens", "lm_head", "region_encoder", "query_head", "vision_branch"}
    if train_vision_backbone:
        trainable_groups.add("vision_backbone")
    if train_clip:
        trainable_groups.add("clip_tower")
    if train_llm_base:
        trainable_groups |= {"llm_base", "mm_projector"}
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_group(name) in trainable_groups)


def parameter_table(model: nn.Module) -> str:
    """A text table: parameters per group, how many are trainable, and the totals."""
    totals: "OrderedDict[str, list[int]]" = OrderedDict()
    for name, param in model.named_parameters():  # shared tensors are listed once by named_parameters
        row = totals.setdefault(parameter_group(name), [0, 0])
        row[0] += param.numel()
        row[1] += param.numel() if param.requires_grad else 0
    width = max([len(k) for k in totals] + [5])
    lines = [f"{'group':<{width}}  {'parameters':>15}  {'trainable':>15}"]
    for group, (count, trainable) in totals.items():
        lines.append(f"{group:<{width}}  {count:>15,}  {trainable:>15,}")
    all_count = sum(v[0] for v in totals.values())
    all_trainable = sum(v[1] for v in totals.values())
    lines.append(f"{'total':<{width}}  {all_count:>15,}  {all_trainable:>15,}")
    return "\n".join(lines)
