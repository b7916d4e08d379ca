"""Weights: upstream checkpoint import, save_pretrained/from_pretrained, 13B parameter counts."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from chatterbox.model.chatterbox import ChatterBox
from chatterbox.model.presets import count_parameters, preset
from chatterbox.model.weights import WeightsError, load_upstream_checkpoint, ours_to_upstream, upstream_to_ours
from tests.conftest import tiny_upstream_policy
from tests.test_model_chatterbox import build_tiny, make_batch

MANIFEST = Path("/work/shared/spec/checkpoints/chatterbox_full_state_dict.json")
if not MANIFEST.is_file():
    MANIFEST = Path(__file__).resolve().parent / "data" / "chatterbox_full_state_dict.json"


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".N", name)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def upstream_state_dict(model: ChatterBox) -> dict[str, torch.Tensor]:
    """Our tiny model's weights under upstream's names (+ the rotary buffers upstream stored), random values."""
    g = torch.Generator().manual_seed(3)
    state, by_storage = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith("clip_tower."):
            continue
        if id(tensor) not in by_storage:  # shared tensors (the vision box head) get one value, as in a real file
            by_storage[id(tensor)] = (torch.randn(tensor.shape, generator=g).to(tensor.dtype)
                                      if tensor.is_floating_point() else tensor.detach().clone())
        state[ours_to_upstream(name)] = by_storage[id(tensor)].clone()
    for layer in range(model.causal_lm.config.num_hidden_layers):
        state[f"lm.base_model.model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    state["tgt_align.weight"] = torch.zeros(256, 256)
    state["refpoint_align.bias"] = torch.zeros(4)
    return state


@pytest.mark.skipif(not MANIFEST.is_file(), reason="checkpoint manifest not available")
def test_upstream_names_match_the_manifest_and_every_key_lands(tokenizer):
    manifest = json.loads(MANIFEST.read_text())
    manifest_patterns = {_pattern(k) for k in list(manifest["params"]) + list(manifest["buffers"])}
    source = build_tiny(tokenizer)
    state = upstream_state_dict(source)
    our_patterns = {_pattern(k) for k in state}
    # Every name we produce is a name upstream uses, and every kind of upstream key has a place here
    # (tgt_align/refpoint_align: dead upstream heads, skipped on purpose).
    assert our_patterns - manifest_patterns == set()
    dead = {p for p in manifest_patterns if p.startswith(("tgt_align.", "refpoint_align."))}
    assert manifest_patterns - our_patterns - dead == set()

    target = build_tiny(tokenizer)
    report = load_upstream_checkpoint(target, state)
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len([k for k in target.state_dict() if not k.startswith("clip_tower.")])
    assert all("inv_freq" in k or k.startswith(("tgt_align", "refpoint_align")) for k in report.skipped)
    loaded = target.state_dict()
    for upstream_name, value in state.items():
        ours = upstream_to_ours(upstream_name, ["q_proj", "v_proj"])
        if ours in loaded:
            assert torch.equal(loaded[ours], value), upstream_name

    missing_one = dict(state)
    del missing_one["spi_module.roi_align.updims.weight"]
    with pytest.raises(WeightsError, match=r"missing 1 keys \(region_encoder\.output_projection\.weight\)"):
        load_upstream_checkpoint(target, missing_one)
    extra = {**state, "spi_module.roi_align.extra.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"unexpected 1 keys \(spi_module\.roi_align\.extra\.weight\)"):
        load_upstream_checkpoint(target, extra)
    report = load_upstream_checkpoint(target, extra, strict=False)
    assert report.unexpected == ["spi_module.roi_align.extra.weight"]
    alias = "visual_grounding_model.bbox_embed.1.layers.0.bias"
    with pytest.raises(WeightsError, match="shared"):
        load_upstream_checkpoint(target, {**state, alias: state[alias] + 1})
    bad_shape = {**state, "text_hidden_fcs.0.2.bias": torch.zeros(3)}
    with pytest.raises(WeightsError, match="text_hidden_fcs.0.2.bias"):
        load_upstream_checkpoint(target, bad_shape, strict=False)


def _outputs(model, tokenizer):
    batch = make_batch(tokenizer)
    model.eval()
    with torch.no_grad():
        model.cfg.zero_lm_loss_on_grounding = False
        out = model(**batch)
        hidden = model.build_inputs_embeds(batch["input_ids"], batch["images_clip"], batch["offset"],
                                           batch["region_boxes_xyxy_clip_norm"])
    return out, hidden


def test_save_pretrained_round_trip_is_bit_exact(tokenizer, tmp_path):
    model = build_tiny(tokenizer)
    with torch.no_grad():  # make LoRA non-trivial so that it matters
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)
    expected, expected_embeds = _outputs(model, tokenizer)
    model.save_pretrained(tmp_path / "export")
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert {"config.yaml", "export.json", "tokenizer", "model.safetensors", "README.md"} <= set(files)
    loaded = ChatterBox.from_pretrained(tmp_path / "export")
    got, got_embeds = _outputs(loaded, tokenizer)
    assert torch.equal(got_embeds, expected_embeds)
    for key in ("lm_loss", "grounding_loss", "loss", "loss_ce", "loss_bbox"):
        assert torch.equal(got[key], expected[key]), key

    merged_dir = model.save_pretrained(tmp_path / "merged", merge_lora=True)
    merged = ChatterBox.from_pretrained(merged_dir)
    assert merged.cfg.language.lora_r == 0
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    got_merged, _ = _outputs(merged, tokenizer)
    torch.testing.assert_close(got_merged["lm_loss"], expected["lm_loss"], rtol=1e-4, atol=1e-5)


def test_an_interrupted_save_leaves_the_previous_export_and_other_folders_are_not_written_over(
        tokenizer, tmp_path, monkeypatch):
    from chatterbox.model import hub
    model = build_tiny(tokenizer)
    export = model.save_pretrained(tmp_path / "export")
    before = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C during the last file of the save looks like

    monkeypatch.setattr(hub, "model_card", fail)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(export)
    assert {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left behind
    monkeypatch.undo()

    model.save_pretrained(export)  # a completed save replaces it whole
    assert {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()} != before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "results.txt").write_text("mine")
    with pytest.raises(WeightsError, match=r"notes: exists and is not an export \(no export.json\)"):
        model.save_pretrained(notes)
    assert [p.name for p in notes.iterdir()] == ["results.txt"]


def test_a_merged_export_keeps_a_clip_trained_from_a_pretrained_folder(tokenizer, tmp_path):
    """The tiny recipe trains a CLIP it loads from a folder (scripts/pretrain_clip.py): the self-contained
    export must carry the trained tower, not point back at the folder's weights."""
    from chatterbox.config import load_config
    from chatterbox.model.clip_tower import clip_vision_config
    from transformers import CLIPVisionModel

    cfg = load_config("tiny_stage1")
    CLIPVisionModel(clip_vision_config(cfg.model.clip)).save_pretrained(str(tmp_path / "clip"))
    cfg.model.clip.clip_path = str(tmp_path / "clip")
    model = ChatterBox.build(cfg.model, tokenizer=tokenizer, verbose=False)
    assert model.clip_tower.vision_model.embeddings.patch_embedding.weight.requires_grad  # the preset trains it
    with torch.no_grad():  # what training does to it
        model.clip_tower.vision_model.embeddings.patch_embedding.weight.add_(0.5)
    trained = model.clip_tower.state_dict()
    merged_dir = model.save_pretrained(tmp_path / "merged", merge_lora=True)
    (tmp_path / "clip" / "model.safetensors").unlink()  # self-contained: the folder is not needed again
    merged = ChatterBox.from_pretrained(merged_dir)
    assert merged.cfg.clip.clip_path == ""
    for name, value in merged.clip_tower.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_a_broken_export_names_its_file(tokenizer, tmp_path):
    from chatterbox.model.weights import WeightsError

    export = build_tiny(tokenizer).save_pretrained(tmp_path / "export")
    weights = export / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(WeightsError, match=rf"{weights}: unreadable weights file"):
        ChatterBox.from_pretrained(export)
    weights.write_bytes(good)
    (export / "export.json").write_text('{"format": ')
    with pytest.raises(WeightsError, match=rf"{export / 'export.json'}: not valid JSON"):
        ChatterBox.from_pretrained(export)


def test_an_evaluation_refuses_an_export_its_config_cannot_feed(tokenizer, tmp_path, caplog):
    from chatterbox.config import ConfigError, load_config
    from chatterbox.eval.runner import load_eval_model

    cfg = load_config("tiny_stage2")
    export = ChatterBox.build(cfg.model, tokenizer=tokenizer, verbose=False).save_pretrained(tmp_path / "export")
    model = load_eval_model(cfg, str(export), torch.device("cpu"), torch.float32)  # the config it was built with
    assert model.cfg.clip.image_size == cfg.model.clip.image_size == 112
    other = load_config("tiny_stage2", ["model.clip.image_size=224"])
    with pytest.raises(ConfigError, match=r"does not fit --config tiny_stage2: model.clip.image_size: 112 in the "
                                          r"export, 224 in --config; use the config"):
        load_eval_model(other, str(export), torch.device("cpu"), torch.float32)
    with caplog.at_level("WARNING"):
        load_eval_model(load_config("tiny_stage2", ["model.language.lora_r=4"]), str(export), torch.device("cpu"),
                        torch.float32)
    assert "other model settings than --config tiny_stage2 (model.language.lora_r)" in caplog.text


def test_trainable_export_references_base_weights(tokenizer, tmp_path):
    model = build_tiny(tokenizer)
    model.cfg.clip.clip_path = "/models/clip-vit-large-patch14"  # referenced, so CLIP is not written
    model.save_pretrained(tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert meta["base_weights"]["clip"] == "/models/clip-vit-large-patch14"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= names and not any(k.startswith("clip_tower.") for k in names)


def test_13b_parameter_counts_on_meta_device():
    counts = count_parameters(preset("13b"))
    assert counts["llm"] == 13_021_112_320
    assert counts["mm_projector"] == 5_248_000
    assert counts["clip"] == 303_179_776
    assert counts["region_encoder"] == 300_192_512
    assert counts["query_head"] == 27_530_496
    assert counts["vision_branch"] == 123_224_704
    assert counts["vision_backbone"] == 86_880_120


def write_llava_folder(folder: Path, cfg) -> torch.nn.Module:
    """A LLaVA-LLaMA checkpoint folder of ``cfg.language`` (random weights) as transformers 4.31 wrote the
    public ones: config.json of model_type llava, pytorch_model.bin with the rotary inv_freq buffers."""
    from chatterbox.model.llava_llama import LlavaLlamaForCausalLM, llama_config

    lm = LlavaLlamaForCausalLM(llama_config(cfg.language, mm_hidden_size=cfg.clip.hidden_size))
    folder.mkdir(parents=True)
    state = dict(lm.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, folder / "pytorch_model.bin")
    config = {**lm.config.to_dict(), "model_type": "llava", "mm_use_im_start_end": False}
    (folder / "config.json").write_text(json.dumps(config))
    return lm


def test_llava_folder_and_clip_folder_load(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from chatterbox.model.clip_tower import clip_vision_config
    from chatterbox.model.weights import load_clip_vision, load_llava_llama

    cfg = tiny_upstream_policy()
    torch.manual_seed(0)
    folder = tmp_path / "llava"
    lm = write_llava_folder(folder, cfg)
    loaded = load_llava_llama(folder)
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, lm(input_ids=ids).logits)
    assert torch.equal(loaded.model.mm_projector.weight, lm.model.mm_projector.weight)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["model.extra.weight"] = torch.zeros(1)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="model.extra.weight"):
        load_llava_llama(folder)

    vision = clip_vision_config(cfg.clip).to_dict()
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config={"hidden_size": 16, "intermediate_size": 32,
                                                                   "num_hidden_layers": 1, "num_attention_heads": 2}))
    clip.save_pretrained(tmp_path / "clip")
    tower = load_clip_vision(tmp_path / "clip")
    assert torch.equal(tower.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight)


def test_a_trained_clip_is_exported_even_when_its_base_is_referenced(tokenizer, tmp_path):
    """model.clip.freeze=False: the tower's weights are trained, so the export must hold them."""
    cfg = tiny_upstream_policy()
    cfg.clip.freeze = False
    torch.manual_seed(0)
    model = ChatterBox.build(cfg, tokenizer=tokenizer, verbose=False)
    model.cfg.clip.clip_path = "/models/clip-vit-large-patch14"
    model.save_pretrained(tmp_path / "export")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    clip_names = {n for n, _ in model.clip_tower.named_parameters(prefix="clip_tower")}
    assert clip_names and clip_names <= names
