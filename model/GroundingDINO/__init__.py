"""GroundingDINO vision branch of ChatterBox, driven by [VG] query embeddings instead of BERT text.

Entry points (see docs/vision_branch.md):
    cfg = load_vision_config("swinb_cogcoor")            # or "swint_ogc", "tiny", or a YAML path
    branch = VisionBranch(cfg)
    load_groundingdino_checkpoint(branch, "groundingdino_swinb_cogcoor.pth")
    features = branch.forward_backbone(images)           # frozen Swin, no grad
    outputs = branch.forward_enc_dec(features, queries, query_image_index)
    best = branch.predict_boxes(outputs, image_sizes_wh)
    losses = GroundingCriterion(cfg)(outputs, target_boxes_cxcywh_norm)
"""
from .backbone import BackboneFeatures
from .checkpoint import (CheckpointError, LoadReport, check_state_dict_layout, load_groundingdino_checkpoint,
                         load_vision_state_dict, read_state_dict)
from .config import VisionBranchConfig, load_vision_config
from .criterion import GroundingCriterion, sigmoid_focal_loss
from .groundingdino import BoxPrediction, VisionBranch, build_vision_branch, select_best_boxes
from .matcher import HungarianMatcher

__all__ = [
    "BackboneFeatures", "BoxPrediction", "CheckpointError", "GroundingCriterion", "HungarianMatcher", "LoadReport",
    "VisionBranch", "VisionBranchConfig", "build_vision_branch", "check_state_dict_layout",
    "load_groundingdino_checkpoint", "load_vision_config", "load_vision_state_dict", "read_state_dict",
    "select_best_boxes", "sigmoid_focal_loss",
]
