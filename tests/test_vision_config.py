"""Vision-branch config: YAML files load into the typed dataclass; bad files fail naming the field."""
from __future__ import annotations

import dataclasses

import pytest

from chatterbox.config_schema import ConfigError
from model.GroundingDINO.config import VisionBranchConfig, load_vision_config


def test_swinb_file_is_the_default_chatterbox_setting():
    cfg = load_vision_config("swinb_cogcoor")
    assert cfg == VisionBranchConfig()
    assert (cfg.backbone, cfg.swin_window_size, cfg.num_queries, cfg.enc_layers, cfg.dec_layers) == \
        ("swin_B_384_22k", 12, 900, 6, 6)
    assert cfg.backbone_out_channels == [256, 512, 1024]


def test_every_shipped_config_loads():
    swint = load_vision_config("swint_ogc")
    assert swint.backbone_out_channels == [192, 384, 768] and swint.swin_window_size == 7
    tiny = load_vision_config("tiny")
    assert tiny.num_queries == 30 and tiny.dec_layers == 2


def test_loss_weights_cover_final_aux_and_interm_terms():
    weights = VisionBranchConfig().loss_weights
    assert len(weights) == 21  # (1 final + 5 aux + 1 interm) x (ce, bbox, giou)
    assert weights["loss_ce"] == 2.0 and weights["loss_bbox_4"] == 5.0 and weights["loss_giou_interm"] == 2.0


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_dim: 256\nnum_querys: 900\n")
    with pytest.raises(ConfigError, match="num_querys"):
        load_vision_config(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("enc_layers: six\n")
    with pytest.raises(ConfigError, match="enc_layers"):
        load_vision_config(path)
    path.write_text("swin_depths: [2, 2, x, 2]\n")
    with pytest.raises(ConfigError, match=r"swin_depths\[2\]"):
        load_vision_config(path)


def test_preset_contradiction_and_unknown_name_fail():
    with pytest.raises(ValueError, match="swin_window_size"):
        VisionBranchConfig(swin_window_size=7)
    with pytest.raises(FileNotFoundError, match="known names"):
        load_vision_config("does_not_exist")


def test_config_is_plain_data():
    for f in dataclasses.fields(VisionBranchConfig):
        assert f.type in ("str", "int", "float", "bool", "list[int]", "list[float]"), f.name
