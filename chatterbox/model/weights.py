"""Where ChatterBox's weights come from and go to.

* ``build_model(cfg)``: LLaVA-LLaMA HF folder (safetensors or .bin shards; layout of
  spec/checkpoints/llava_llama2_13b_layout.json), CLIP HF folder, GroundingDINO .pth via the vision
  branch's loader; random init where a path is empty (tiny preset, tests). Each path may instead be a
  Hugging Face Hub id (chatterbox/model/hub.py).
* ``load_upstream_checkpoint``: upstream's DeepSpeed ``mp_rank_00_model_states.pt`` (key ``module``,
  layout spec/checkpoints/chatterbox_full_state_dict.json) through the explicit rename table below.
* ``save_pretrained`` / ``load_pretrained``: a folder in the Hub layout: config.yaml + tokenizer/ +
  model.safetensors (or shards + model.safetensors.index.json) with the trained weights and the base parts
  without a source path + export.json with the base references + a README.md model card; or a merged-LoRA
  export that stands on its own. Format-1 exports (trainable.safetensors + base.safetensors) still load.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from chatterbox import config_schema
from chatterbox.model.config import ModelConfig

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 2
#: format 1 listed its weight files in export.json: trainable.safetensors (+ base.safetensors).
LEGACY_EXPORT_FORMAT = 1
_SHOWN = 12


class WeightsError(RuntimeError):
    """A checkpoint or export that does not fit the model (names every offending key)."""


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


# ---------------------------------------------------------------------------------------------------
# base weights
def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(payload, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(payload).__name__}")
    return payload


def checkpoint_shards(folder: Path) -> list[Path]:
    """The weight files of an HF folder: an index's shards, else the single-file checkpoint."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise WeightsError(f"{index}: not a checkpoint index ({type(e).__name__}: {e})") from None
            return [folder / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no model.safetensors / pytorch_model.bin (or their index) found")


def llava_llama_config(folder: Path, attn_implementation: str):
    """LlamaConfig from a LLaVA checkpoint's config.json (model_type "llava" there is LLaMA + projector)."""
    from transformers import LlamaConfig

    raw = json.loads((folder / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "initializer_range",
            "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")
    values = {k: raw[k] for k in keys if raw.get(k) is not None}
    if "mm_hidden_size" not in raw:
        raise WeightsError(f"{folder}/config.json has no mm_hidden_size: not a LLaVA checkpoint")
    return LlamaConfig(**values, mm_hidden_size=raw["mm_hidden_size"], tie_word_embeddings=False,
                       attn_implementation=attn_implementation)


def load_llava_llama(folder: str | os.PathLike, attn_implementation: str = "sdpa"):
    """Build LlavaLlamaForCausalLM on the meta device and assign the checkpoint's tensors (strict)."""
    from chatterbox.model.llava_llama import LlavaLlamaForCausalLM

    folder = Path(folder)
    config = llava_llama_config(folder, attn_implementation)
    with torch.device("meta"):
        lm = LlavaLlamaForCausalLM(config)
    expected = dict(lm.state_dict())
    seen, unexpected = set(), []
    for shard in checkpoint_shards(folder):
        state = read_tensor_file(shard)
        kept = {}
        for key, tensor in state.items():
            if key.endswith("rotary_emb.inv_freq"):
                continue  # transformers 4.31 stored it; it is computed from the config now
            if key not in expected:
                unexpected.append(key)
                continue
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise WeightsError(f"{shard}: {key} has shape {tuple(tensor.shape)}, the config implies "
                                   f"{tuple(expected[key].shape)}")
            kept[key] = tensor
        lm.load_state_dict(kept, strict=False, assign=True)
        seen.update(kept)
    missing = set(expected) - seen
    if missing or unexpected:
        raise WeightsError(f"LLaVA checkpoint {folder}: missing keys {_names(missing)}; unexpected keys "
                           f"{_names(unexpected)}")
    # Non-persistent buffers (rotary inv_freq) were created on meta: recompute them on the CPU.
    with torch.device("cpu"):
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)
    still_meta = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if still_meta:
        raise WeightsError(f"LLaVA checkpoint {folder}: tensors left uninitialised: {_names(still_meta)}")
    return lm


def load_clip_vision(folder: str | os.PathLike):
    """CLIPVisionModel from a local openai/clip-vit-large-patch14 folder (full CLIP or vision-only)."""
    from transformers import CLIPVisionModel

    model, info = CLIPVisionModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    if info.get("missing_keys"):
        raise WeightsError(f"CLIP checkpoint {folder}: missing keys {_names(info['missing_keys'])}")
    return model


def build_tokenizer(cfg: ModelConfig):
    from chatterbox.model import hub
    from chatterbox.tokens import load_tokenizer

    lang = cfg.language
    key, path = (("tokenizer_path", lang.tokenizer_path) if lang.tokenizer_path else ("llm_path", lang.llm_path))
    if path:
        path = str(hub.resolve_folder(path, f"model.language.{key}", hub.TOKENIZER_FILES))
    else:
        from chatterbox.tiny_tokenizer import build_tiny_tokenizer, default_tiny_tokenizer_dir

        path = str(build_tiny_tokenizer(default_tiny_tokenizer_dir()))
        logger.info("no tokenizer path configured: using the tiny tokenizer in %s", path)
    return load_tokenizer(path, lang.model_max_length)


def build_model(cfg: ModelConfig, tokenizer=None):
    """A ChatterBox with base weights from the configured paths (random where a path is empty)."""
    from model.GroundingDINO import VisionBranch, load_groundingdino_checkpoint

    from chatterbox.model import hub
    from chatterbox.model.chatterbox import ChatterBox
    from chatterbox.model.clip_tower import ClipTower
    from chatterbox.model.llava_llama import LlavaLlamaForCausalLM, llama_config, resize_vocabulary
    from chatterbox.model.lora import apply_lora

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    lang = cfg.language
    if lang.llm_path:
        lm = load_llava_llama(hub.resolve_model_folder(lang.llm_path, "model.language.llm_path"),
                              lang.attn_implementation)
    else:
        lm = LlavaLlamaForCausalLM(llama_config(lang, mm_hidden_size=cfg.clip.hidden_size))
    resize_vocabulary(lm, len(tokenizer), std=lm.config.initializer_range)
    lm.config.use_cache = False
    lm = apply_lora(lm, lang)

    clip_model = None
    if cfg.clip.clip_path:
        clip_model = load_clip_vision(hub.resolve_model_folder(cfg.clip.clip_path, "model.clip.clip_path"))
    if clip_model is not None:
        for name in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
            if getattr(clip_model.config, name) != getattr(cfg.clip, name):
                raise WeightsError(f"CLIP checkpoint {cfg.clip.clip_path}: {name}="
                                   f"{getattr(clip_model.config, name)} but config clip.{name}="
                                   f"{getattr(cfg.clip, name)}")
    clip_tower = ClipTower(cfg.clip, clip_model)

    vision = VisionBranch(cfg.vision)
    if cfg.vision_weights:
        load_groundingdino_checkpoint(vision, hub.resolve_file(cfg.vision_weights, "model.vision_weights"))
    model = ChatterBox(cfg, tokenizer, lm, clip_tower, vision)
    model.set_gradient_checkpointing(lang.gradient_checkpointing_layers if lang.gradient_checkpointing else 0)
    return model


# ---------------------------------------------------------------------------------------------------
# upstream checkpoints (mp_rank_00_model_states.pt)
#: upstream prefix -> our prefix; the first match wins. Derived from chatterbox_full_state_dict.json.
UPSTREAM_PREFIXES: list[tuple[str, str]] = [
    ("lm.", "language_model."),
    ("spi_module.mlvl_fuse.input_conv.", "region_encoder.fuse.input_convs."),
    ("spi_module.mlvl_fuse.fuse_convs.", "region_encoder.fuse.rounds."),
    ("spi_module.roi_align.pconvs.", "region_encoder.level_convs."),
    ("spi_module.roi_align.flatten_linear.", "region_encoder.roi_projection."),
    ("spi_module.roi_align.pos_embedd.", "region_encoder.box_position_mlp."),
    ("spi_module.roi_align.updims.", "region_encoder.output_projection."),
    ("text_hidden_fcs.0.", "query_head.mlp."),
    ("visual_grounding_model.", "vision_branch."),
    ("tgt_align.", "tgt_align."),
    ("refpoint_align.", "refpoint_align."),
]
#: inside the region encoder's fuse rounds mmcv's ConvModule names its norm "gn".
_UPSTREAM_SUFFIXES = [(".gn.", ".norm.")]
#: keys upstream stores that this implementation computes or deliberately drops.
UPSTREAM_SKIPPED = (re.compile(r"rotary_emb\.inv_freq$"),)
UPSTREAM_DEAD_HEADS = ("tgt_align.", "refpoint_align.")


def _lora_base_layer(key: str, lora_targets: list[str]) -> str:
    """peft >= 0.7 keeps the wrapped weight under ``<target>.base_layer.weight`` (peft 0.4: ``<target>.weight``)."""
    for target in lora_targets:
        key = re.sub(rf"\.{re.escape(target)}\.(weight|bias)$", rf".{target}.base_layer.\1", key)
    return key


def upstream_to_ours(key: str, lora_targets: list[str] | None) -> str | None:
    """Our state-dict name of an upstream key (None for keys we compute instead of load)."""
    if any(p.search(key) for p in UPSTREAM_SKIPPED):
        return None
    for src, dst in UPSTREAM_PREFIXES:
        if key.startswith(src):
            ours = dst + key[len(src):]
            if src == "spi_module.mlvl_fuse.fuse_convs.":
                for a, b in _UPSTREAM_SUFFIXES:
                    ours = ours.replace(a, b)
            if src == "lm." and lora_targets:
                ours = _lora_base_layer(ours, lora_targets)
            return ours
    return key  # unknown: reported as unexpected under its own name


def ours_to_upstream(key: str) -> str:
    """Inverse of upstream_to_ours (for exporting to / testing against upstream's layout)."""
    key = re.sub(r"\.base_layer\.(weight|bias)$", r".\1", key)
    for src, dst in UPSTREAM_PREFIXES:
        if key.startswith(dst):
            theirs = src + key[len(dst):]
            if src == "spi_module.mlvl_fuse.fuse_convs.":
                for a, b in _UPSTREAM_SUFFIXES:
                    theirs = theirs.replace(b, a)
            return theirs
    return key


@dataclass
class UpstreamLoadReport:
    loaded: list[str] = field(default_factory=list)  # our names
    skipped: list[str] = field(default_factory=list)  # upstream names computed here or deliberately dropped
    missing: list[str] = field(default_factory=list)  # our names the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # upstream names with no place in our model


def read_upstream_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    payload = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(payload, dict) and "module" in payload and isinstance(payload["module"], dict):
        payload = payload["module"]
    if not isinstance(payload, dict):
        raise WeightsError(f"{path}: expected a DeepSpeed model-states dict with a 'module' state dict")
    return payload


def load_upstream_checkpoint(model: nn.Module, source, strict: bool = True) -> UpstreamLoadReport:
    """Load upstream's full ChatterBox state dict (a path to mp_rank_00_model_states.pt or a dict).

    CLIP is not in upstream checkpoints (it keeps its own weights); rotary ``inv_freq`` is recomputed;
    ``tgt_align``/``refpoint_align`` are skipped unless ``keep_unused_upstream_heads``. With ``strict`` any
    missing or unexpected key, and always any shape mismatch, raises WeightsError naming the keys.
    """
    state = read_upstream_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    lora_targets = list(model.cfg.language.lora_target_modules) if model.cfg.language.lora_r > 0 else None
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("clip_tower.")}
    report = UpstreamLoadReport()
    mapped: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, tensor in state.items():
        name = upstream_to_ours(key, lora_targets)
        if name is None or (key.startswith(UPSTREAM_DEAD_HEADS) and name not in ours):
            report.skipped.append(key)
            continue
        if name not in ours:
            report.unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(ours[name].shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(ours[name].shape)}")
            continue
        mapped[name] = tensor.to(dtype=ours[name].dtype)
    report.missing = sorted(set(ours) - set(mapped))
    report.loaded = sorted(mapped)
    report.unexpected.sort()
    if mismatched:
        raise WeightsError("upstream checkpoint shape mismatches: " + "; ".join(mismatched[:_SHOWN]))
    if strict and (report.missing or report.unexpected):
        raise WeightsError(f"upstream checkpoint does not fit: missing {len(report.missing)} keys "
                           f"({_names(report.missing)}); unexpected {len(report.unexpected)} keys "
                           f"({_names(report.unexpected)})")
    for names in _shared_groups(model):
        present = [n for n in names if n in mapped]
        for other in present[1:]:
            if not torch.equal(mapped[present[0]], mapped[other]):
                raise WeightsError(f"upstream checkpoint: {present[0]} and {other} are one shared tensor here but "
                                   "differ in the checkpoint")
    model.load_state_dict(mapped, strict=False)
    return report


def _shared_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that refer to one tensor (the vision branch's shared box head)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


# ---------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
def _base_source(name: str) -> str:
    if name.startswith("clip_tower."):
        return "clip"
    if name.startswith("vision_branch."):
        return "vision"
    if name.startswith("language_model."):
        return "llm"
    return "new"


def _source_paths(cfg: ModelConfig) -> dict[str, str]:
    return {"llm": cfg.language.llm_path, "clip": cfg.clip.clip_path, "vision": cfg.vision_weights, "new": ""}


def _merged_language_state(model) -> dict[str, torch.Tensor]:
    """The LLM state dict with every LoRA delta folded into its base weight, under un-wrapped names."""
    lm = model.language_model
    state = {f"language_model.{k}": v for k, v in lm.state_dict().items()}
    if not hasattr(lm, "get_base_model"):
        return state
    merged = {}
    lora_modules = {n: m for n, m in lm.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        merged[key] = value
    for name, module in lora_modules.items():
        if "default" not in module.lora_A:
            continue
        delta = (module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()) \
            * module.scaling["default"]
        key = f"language_model.{name}.base_layer.weight"
        merged[key] = (merged[key].float() + delta).to(merged[key].dtype)
    unwrapped = {}
    for key, value in merged.items():
        key = key.replace("language_model.base_model.model.", "language_model.", 1)
        unwrapped[re.sub(r"\.base_layer\.", ".", key)] = value
    return unwrapped


def save_pretrained(model, directory: str | os.PathLike, merge_lora: bool = False,
                    max_shard_size: int | str = "5GB") -> Path:
    """Write the export folder in the Hub layout (``hf upload owner/name <folder>`` publishes it).

    The weights go to model.safetensors, or to shards of at most ``max_shard_size`` (bytes or "5GB") listed
    in model.safetensors.index.json, transformers' names and format. The folder is written beside the target
    and swapped in whole, so an interrupted save leaves the previous export as it was; a folder that holds
    anything but an export is refused, not written over.
    """
    if model.quantization != "none":
        raise WeightsError(f"the model is quantised ({model.quantization}) for inference; save the export it "
                           "was loaded from instead")
    final = Path(directory)
    if final.is_dir() and any(final.iterdir()) and not (final / "export.json").is_file():
        raise WeightsError(f"{final}: exists and is not an export (no export.json); not writing over its files")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    replaced = final.parent / f".{final.name}.replaced-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_export(model, staging, merge_lora, max_shard_size)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        os.replace(final, replaced)
    os.replace(staging, final)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def _write_export(model, out: Path, merge_lora: bool, max_shard_size: int | str) -> None:
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    from chatterbox.model import hub

    cfg = config_schema.from_dict(ModelConfig, config_schema.to_dict(model.cfg))
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k, v in model.state_dict().items()}
    if merge_lora:
        state = {k: v for k, v in state.items() if not k.startswith("language_model.")}
        state.update(_merged_language_state(model))
        cfg.language.lora_r = 0
        cfg.language.llm_path = ""
        cfg.vision_weights = ""
        if any(name.startswith("clip_tower.") for name in trainable_names):
            cfg.clip.clip_path = ""  # a CLIP trained past its pretrained folder is saved, not referenced
    paths = _source_paths(cfg)
    # safetensors refuses shared storage: the vision branch's box head is registered under several names.
    exported = _unshare({name: tensor for name, tensor in state.items()
                         if name in trainable_names or not paths[_base_source(name)]})
    # Sized by their own bytes: after DeepSpeed training the parameters are views into one flat buffer, which
    # huggingface_hub's torch helpers would take for a single shared tensor.
    split = split_state_dict_into_shards_factory(exported, get_storage_size=lambda t: t.numel() * t.element_size(),
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    for file_name, names in split.filename_to_tensors.items():
        save_file({name: exported[name] for name in names}, str(out / file_name), metadata={"format": "pt"})
    if split.is_sharded:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
    (out / "config.yaml").write_text(yaml.safe_dump(config_schema.to_dict(cfg), sort_keys=False))
    model.tokenizer.save_pretrained(str(out / "tokenizer"))
    base_weights = {k: v for k, v in paths.items() if k != "new"}
    (out / "export.json").write_text(json.dumps({
        "format": EXPORT_FORMAT, "merged_lora": merge_lora, "base_weights": base_weights}, indent=2))
    hub.model_card(cfg, base_weights, lineage=_source_paths(model.cfg), merged_lora=merge_lora).save(out / "README.md")


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    result = {}
    for name, tensor in tensors.items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        result[name] = tensor.detach().clone().contiguous() if key in seen else tensor.detach().contiguous()
        seen.setdefault(key, name)
    return result


def _read_export(folder: Path) -> tuple[dict, ModelConfig]:
    meta_path = folder / "export.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no export.json (not a ChatterBox.save_pretrained directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (LEGACY_EXPORT_FORMAT, EXPORT_FORMAT):
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise WeightsError(f"{meta_path}: export format {found!r}, expected {EXPORT_FORMAT} "
                           f"(or {LEGACY_EXPORT_FORMAT})")
    if meta["format"] == LEGACY_EXPORT_FORMAT and not isinstance(meta.get("files"), list):
        raise WeightsError(f"{meta_path}: no 'files' list (the export's weight files)")
    config_path = folder / "config.yaml"
    try:
        cfg = config_schema.from_dict(ModelConfig, yaml.safe_load(config_path.read_text()))
    except FileNotFoundError:
        raise WeightsError(f"{config_path}: missing (every export has its model config)") from None
    except (yaml.YAMLError, config_schema.ConfigError, TypeError, AttributeError) as e:
        raise WeightsError(f"{config_path}: not a model config ({str(e).splitlines()[0]})") from None
    return meta, cfg


def _export_weight_files(folder: Path, meta: dict) -> list[Path]:
    if meta["format"] == LEGACY_EXPORT_FORMAT:
        return [folder / name for name in meta["files"]]
    try:
        return checkpoint_shards(folder)
    except FileNotFoundError as e:
        raise WeightsError(str(e)) from None


def load_export_weights(model, directory: str | os.PathLike) -> None:
    """Load an export's tensors into an already built model (every exported tensor must fit it).

    Used by stage 2, which builds its model from its own config and starts from stage 1's weights.
    """
    folder = Path(directory)
    meta, _ = _read_export(folder)
    expected = model.state_dict()
    provided: dict[str, torch.Tensor] = {}
    for path in _export_weight_files(folder, meta):
        try:
            provided.update(read_tensor_file(path))
        except FileNotFoundError:
            raise WeightsError(f"{path}: listed in the export but missing") from None
        except Exception as e:  # safetensors raises its own SafetensorError on truncated/corrupt files
            raise WeightsError(f"{path}: unreadable weights file ({str(e).splitlines()[0]})") from None
    unexpected = set(provided) - set(expected)
    paths = _source_paths(model.cfg)
    missing = {k for k in expected if k not in provided and not paths[_base_source(k)]}
    if unexpected or missing:
        raise WeightsError(f"{folder}: export does not fit the model: missing {_names(missing)}; "
                           f"unexpected {_names(unexpected)}")
    mismatched = {k for k, v in provided.items() if v.shape != expected[k].shape}
    if mismatched:
        raise WeightsError(f"{folder}: shape mismatch for {_names(mismatched)}")
    model.load_state_dict(provided, strict=False)


def load_pretrained(directory: str | os.PathLike):
    """An export from its folder or from the Hub id of a repo holding one (``owner/name[@revision]``)."""
    from chatterbox.model import hub
    from chatterbox.tokens import load_tokenizer

    folder = hub.resolve_folder(str(directory), "export", hub.EXPORT_FILES)
    _, cfg = _read_export(folder)
    tokenizer = load_tokenizer(str(folder / "tokenizer"), cfg.language.model_max_length)
    model = build_model(cfg, tokenizer)
    load_export_weights(model, folder)
    return model
