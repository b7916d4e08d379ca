"""Typed configuration of the GroundingDINO vision branch.

Defaults reproduce upstream ChatterBox's vision branch (``config/cfg_odvg_swinbase.py``: Swin-B 384/22k,
4 feature levels, 6+6 layers, 900 queries, two-stage "standard"), see spec/upstream.md §1.5-1.6.
The dataclass holds plain values only so that the project-wide config can nest it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatterbox import config_schema

__all__ = ["VisionBranchConfig", "SWIN_PRESETS", "load_vision_config", "VISION_CONFIG_DIR"]

# Architecture of the Swin variants GroundingDINO ships weights for (upstream backbone/swin_transformer.py).
SWIN_PRESETS: dict[str, dict[str, Any]] = {
    "swin_T_224_1k": dict(swin_embed_dim=96, swin_depths=[2, 2, 6, 2], swin_num_heads=[3, 6, 12, 24],
                          swin_window_size=7, swin_pretrain_img_size=224),
    "swin_B_384_22k": dict(swin_embed_dim=128, swin_depths=[2, 2, 18, 2], swin_num_heads=[4, 8, 16, 32],
                           swin_window_size=12, swin_pretrain_img_size=384),
}
# Any other backbone name means "the swin_* fields say everything" (used by the tiny test config).
CUSTOM_SWIN = "swin_custom"

VISION_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "vision"


@dataclass
class VisionBranchConfig:
    # --- backbone (Swin) -------------------------------------------------------------------------
    backbone: str = "swin_B_384_22k"
    swin_embed_dim: int = 128
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    swin_num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    swin_window_size: int = 12
    swin_pretrain_img_size: int = 384
    swin_patch_size: int = 4
    swin_mlp_ratio: float = 4.0
    swin_drop_path_rate: float = 0.2
    swin_use_checkpoint: bool = True
    # Stages whose outputs feed the transformer (1,2,3 -> strides 8/16/32).
    return_interm_indices: list[int] = field(default_factory=lambda: [1, 2, 3])
    # The backbone runs under torch.no_grad (upstream). While frozen it is also kept in eval mode so
    # that stochastic depth does not perturb "frozen" features; True reproduces upstream (spec §5.2.14).
    freeze_backbone: bool = True
    frozen_backbone_train_mode: bool = False
    # --- position encoding (sine: the only kind upstream uses) ------------------------------------
    pe_temperature_h: float = 20.0
    pe_temperature_w: float = 20.0
    # --- transformer -------------------------------------------------------------------------------
    num_feature_levels: int = 4
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6
    dec_layers: int = 6
    dropout: float = 0.0
    activation: str = "relu"
    num_queries: int = 900
    enc_n_points: int = 4
    dec_n_points: int = 4
    two_stage_bbox_embed_share: bool = False
    use_transformer_ckpt: bool = True  # gradient checkpointing of the encoder deformable layers
    # --- text side (the [VG] query stands in for BERT text features) -----------------------------
    max_text_len: int = 256
    pad_logits_to_max_text_len: bool = False  # True: pred_logits [..., max_text_len] with -inf padding
    use_text_enhancer: bool = True
    text_enhancer_nheads: int = 4
    text_enhancer_dim_feedforward: int = 1024
    text_dropout: float = 0.0
    use_fusion_layer: bool = True
    fusion_embed_dim: int = 1024
    fusion_nheads: int = 4
    fusion_dropout: float = 0.0
    fusion_droppath: float = 0.1
    fusion_init_values: float = 1e-4
    fusion_logit_clamp: float = 50000.0
    fusion_use_checkpoint: bool = True
    use_text_cross_attention: bool = True
    # --- loss ----------------------------------------------------------------------------------------
    aux_loss: bool = True
    interm_loss: bool = True
    loss_ce_weight: float = 2.0
    loss_bbox_weight: float = 5.0
    loss_giou_weight: float = 2.0
    interm_loss_coef: float = 1.0
    matcher_cost_class: float = 1.0
    matcher_cost_bbox: float = 5.0
    matcher_cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # "num_boxes": focal loss divided by the rank-averaged number of target boxes, like L1/GIoU (DETR
    # convention). "local_matches": divided by this rank's matched pairs, as upstream does.
    ce_normalization: str = "num_boxes"
    # --- inference / input -------------------------------------------------------------------------
    box_threshold: float = 0.3
    image_size: int = 512

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field for an inconsistent configuration."""
        preset = SWIN_PRESETS.get(self.backbone)
        if preset is None and self.backbone != CUSTOM_SWIN:
            raise ValueError(
                f"backbone={self.backbone!r}: expected one of {sorted(SWIN_PRESETS) + [CUSTOM_SWIN]}")
        if preset is not None:
            for name, value in preset.items():
                if list(_as_list(getattr(self, name))) != list(_as_list(value)):
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} contradicts backbone={self.backbone!r} "
                        f"(which has {name}={value!r}); use backbone: {CUSTOM_SWIN} for other sizes")
        if len(self.swin_depths) != len(self.swin_num_heads):
            raise ValueError(f"swin_depths {self.swin_depths} and swin_num_heads {self.swin_num_heads} "
                             "must have the same length")
        for i, (dim, heads) in enumerate(zip(self.swin_feature_channels, self.swin_num_heads)):
            if dim % heads:
                raise ValueError(f"swin stage {i}: {dim} channels not divisible by {heads} heads")
        stages = len(self.swin_depths)
        if not self.return_interm_indices or sorted(set(self.return_interm_indices)) != list(
                self.return_interm_indices) or not all(0 <= i < stages for i in self.return_interm_indices):
            raise ValueError(f"return_interm_indices={self.return_interm_indices}: expected increasing "
                             f"stage indices in [0, {stages})")
        if self.num_feature_levels < len(self.return_interm_indices):
            raise ValueError(f"num_feature_levels={self.num_feature_levels} is smaller than the "
                             f"{len(self.return_interm_indices)} backbone outputs")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation={self.activation!r}: expected 'relu' or 'gelu'")
        for name in ("hidden_dim", "fusion_embed_dim"):
            heads = self.nheads if name == "hidden_dim" else self.fusion_nheads
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by its head count {heads}")
        if self.hidden_dim % self.text_enhancer_nheads:
            raise ValueError(f"hidden_dim={self.hidden_dim} not divisible by text_enhancer_nheads")
        if self.hidden_dim % 2 or self.hidden_dim % 32:
            raise ValueError(f"hidden_dim={self.hidden_dim}: must be a multiple of 32 (GroupNorm(32))")
        if self.ce_normalization not in ("num_boxes", "local_matches"):
            raise ValueError(f"ce_normalization={self.ce_normalization!r}: expected 'num_boxes' or 'local_matches'")
        if not 0.0 <= self.box_threshold <= 1.0:
            raise ValueError(f"box_threshold={self.box_threshold}: must lie in [0, 1]")
        if self.num_queries < 1 or self.enc_layers < 1 or self.dec_layers < 1:
            raise ValueError("num_queries, enc_layers and dec_layers must be >= 1")

    @property
    def swin_feature_channels(self) -> list[int]:
        """Channels of each Swin stage's output (embed_dim doubles every stage)."""
        return [self.swin_embed_dim * 2 ** i for i in range(len(self.swin_depths))]

    @property
    def backbone_out_channels(self) -> list[int]:
        return [self.swin_feature_channels[i] for i in self.return_interm_indices]

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weight of every named loss term: final layer, aux layers _0.._{L-2}, encoder output _interm."""
        base = {"loss_ce": self.loss_ce_weight, "loss_bbox": self.loss_bbox_weight,
                "loss_giou": self.loss_giou_weight}
        weights = dict(base)
        if self.aux_loss:
            for i in range(self.dec_layers - 1):
                weights.update({f"{k}_{i}": v for k, v in base.items()})
        if self.interm_loss:
            weights.update({f"{k}_interm": v * self.interm_loss_coef for k, v in base.items()})
        return weights

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "VisionBranchConfig":
        """Strict load (unknown keys and wrong types are errors naming the key), as every project config."""
        return config_schema.load(cls, path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_vision_config(name_or_path: str | Path) -> VisionBranchConfig:
    """A config by name (``swinb_cogcoor``, ``swint_ogc``, ``tiny``: files in configs/vision/) or by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        candidate = VISION_CONFIG_DIR / f"{name_or_path}.yaml"
        if not candidate.is_file():
            names = sorted(p.stem for p in VISION_CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"no vision config named {str(name_or_path)!r}; known names: {names}")
        path = candidate
    return VisionBranchConfig.from_yaml(path)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]
