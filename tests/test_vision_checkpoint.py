"""Checkpoint loading: the Swin-B branch has exactly the layout of the public GroundingDINO weights
(checked on the meta device against spec/checkpoints/), and a real load on the tiny config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.GroundingDINO import (CheckpointError, VisionBranch, check_state_dict_layout,
                                 load_groundingdino_checkpoint, load_vision_config, read_state_dict)

SPEC = Path("/work/shared/spec/checkpoints")
if not SPEC.is_dir():  # the shared spec folder may sit next to the checkout
    SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "checkpoints"
needs_manifests = pytest.mark.skipif(not (SPEC / "groundingdino_official_swinb_cogcoor.json").is_file(),
                                     reason="spec/checkpoints manifests not available")


def _manifest_state_dict(name: str, extra: bool = False) -> dict[str, torch.Tensor]:
    manifest = json.loads((SPEC / name).read_text())
    entries = {**manifest["params"], **manifest["buffers"], **(manifest.get("checkpoint_extra", {}) if extra else {})}
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype) in entries.items()}


@pytest.fixture(scope="module")
def swinb_meta():
    with torch.device("meta"):
        return VisionBranch(load_vision_config("swinb_cogcoor"))


def test_swinb_parameter_count(swinb_meta):
    assert sum(p.numel() for p in swinb_meta.parameters()) == 123_224_704
    assert sum(p.numel() for p in swinb_meta.backbone.parameters()) == 86_880_120
    assert sum(p.numel() for p in swinb_meta.input_proj.parameters()) == 2_821_120


@needs_manifests
def test_swinb_state_dict_equals_chatterbox_manifest(swinb_meta):
    ours = {k: tuple(v.shape) for k, v in swinb_meta.state_dict().items()}
    manifest = {k: tuple(v.shape) for k, v in _manifest_state_dict("groundingdino_chatterbox_swinb.json").items()}
    assert ours == manifest


@needs_manifests
def test_official_layout_is_accepted_with_the_documented_drops(swinb_meta):
    official = _manifest_state_dict("groundingdino_official_swinb_cogcoor.json", extra=True)
    report = check_state_dict_layout(swinb_meta, official)
    assert report.dropped == ["transformer.tgt_embed.weight"]
    assert report.not_loaded == ["transformer.tgt_embed.weight"]
    assert len(report.ignored) == 203
    assert all(k.startswith(("bert.", "feat_map.", "label_enc.")) for k in report.ignored)
    assert len(report.loaded) == 904
    # With drop_tgt_embed=False (e.g. a ChatterBox-trained vision branch) tgt_embed is loaded too.
    assert check_state_dict_layout(swinb_meta, official, drop_tgt_embed=False).not_loaded == []


@needs_manifests
@pytest.mark.parametrize("damage, message", [
    ("missing", "missing keys.*transformer.decoder.layers.3.linear1.weight"),
    ("extra", "unexpected keys.*transformer.decoder.layers.6.linear1.weight"),
    ("shape", "shape mismatches.*input_proj.2.0.weight: checkpoint \\(256, 768, 1, 1\\)"),
])
def test_layout_errors_name_the_key(swinb_meta, damage, message):
    state = _manifest_state_dict("groundingdino_official_swinb_cogcoor.json", extra=True)
    if damage == "missing":
        del state["transformer.decoder.layers.3.linear1.weight"]
    elif damage == "extra":
        state["transformer.decoder.layers.6.linear1.weight"] = torch.empty(2048, 256, device="meta")
    else:
        state["input_proj.2.0.weight"] = torch.empty(256, 768, 1, 1, device="meta")
    with pytest.raises(CheckpointError, match=message):
        check_state_dict_layout(swinb_meta, state)


@pytest.fixture()
def tiny_pair():
    cfg = load_vision_config("tiny")
    torch.manual_seed(0)
    source = VisionBranch(cfg)
    torch.manual_seed(1)
    target = VisionBranch(cfg)
    return source, target


def _official_style_file(model: VisionBranch, path: Path, prefix: str = "module.") -> Path:
    """The model's weights as an official .pth would hold them: decoder norms in fp16, BERT keys, 'model' key."""
    state = {}
    for name, tensor in model.state_dict().items():
        half = ".norm" in name and name.startswith("transformer.decoder.layers.")
        state[prefix + name] = tensor.clone().half() if half else tensor.clone()
    state[prefix + "bert.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
    state[prefix + "feat_map.weight"] = torch.randn(4, 8)
    state[prefix + "label_enc.weight"] = torch.randn(3, 4)
    torch.save({"model": state, "epoch": 3}, path)
    return path


def test_real_load_on_tiny_config(tiny_pair, tmp_path):
    source, target = tiny_pair
    path = _official_style_file(source, tmp_path / "tiny.pth")
    tgt_before = target.transformer.tgt_embed.weight.detach().clone()
    report = load_groundingdino_checkpoint(target, path)
    assert report.dropped == ["transformer.tgt_embed.weight"] and len(report.ignored) == 3
    for name, tensor in target.state_dict().items():
        if name == "transformer.tgt_embed.weight":
            assert torch.equal(tensor, tgt_before)  # dropped on purpose: keeps its own init
        elif ".norm" in name and name.startswith("transformer.decoder.layers."):
            assert tensor.dtype == torch.float32
            torch.testing.assert_close(tensor, source.state_dict()[name].half().float())
        else:
            assert torch.equal(tensor, source.state_dict()[name]), name
    # Same weights (and same tgt_embed when kept) -> same predictions.
    load_groundingdino_checkpoint(target, path, drop_tgt_embed=False)
    source.eval(), target.eval()
    images, queries = torch.randn(1, 3, 128, 128), 0.1 * torch.randn(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(images, queries)["pred_boxes"], source(images, queries)["pred_boxes"],
                                   atol=1e-3, rtol=1e-3)


def test_plain_state_dict_without_wrapper_or_prefix_loads(tiny_pair, tmp_path):
    source, target = tiny_pair
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    assert read_state_dict(tmp_path / "plain.pth").keys() == source.state_dict().keys()
    load_groundingdino_checkpoint(target, tmp_path / "plain.pth")


def test_missing_key_in_a_real_file_is_named(tiny_pair, tmp_path):
    source, target = tiny_pair
    state = source.state_dict()
    del state["transformer.enc_output.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing.pth.*transformer.enc_output.weight"):
        load_groundingdino_checkpoint(target, tmp_path / "missing.pth")


def test_inconsistent_shared_box_head_is_an_error(tiny_pair, tmp_path):
    source, target = tiny_pair
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["transformer.decoder.bbox_embed.1.layers.0.bias"] += 1.0
    torch.save(state, tmp_path / "alias.pth")
    with pytest.raises(CheckpointError, match="shared tensor"):
        load_groundingdino_checkpoint(target, tmp_path / "alias.pth")


def test_truncated_wrong_and_absent_files_fail_clearly(tiny_pair, tmp_path):
    source, target = tiny_pair
    good = _official_style_file(source, tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*cannot be read"):
        load_groundingdino_checkpoint(target, truncated)
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_groundingdino_checkpoint(target, text)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="mapping"):
        load_groundingdino_checkpoint(target, tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_groundingdino_checkpoint(target, tmp_path / "absent.pth")
