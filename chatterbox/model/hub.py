"""Hugging Face Hub ids wherever a weight path is configured, and the model card of an export.

A config value (``model.language.llm_path``, ``model.language.tokenizer_path``, ``model.clip.clip_path``,
``model.vision_weights``, ``train.init_from``, the directory given to ``ChatterBox.from_pretrained``) is
a local path when it exists. Otherwise it may name a Hub repo::

    owner/name                   the repo's main branch (a folder)
    owner/name@revision          a branch, tag or commit
    owner/name[@revision]:file   one file of the repo (the GroundingDINO .pth), e.g.
                                 ShilongLiu/GroundingDINO:groundingdino_swinb_cogcoor.pth

Repos are fetched by huggingface_hub into its cache (``HF_HOME`` / ``HF_HUB_CACHE``), only the files the
loader reads; with ``HF_HUB_OFFLINE=1`` only the cache is consulted. Any failure is one WeightsError line
naming the config key, its value and what was tried.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
from huggingface_hub import ModelCard, ModelCardData, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError, IncompleteSnapshotError,
                                    LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from chatterbox.model.config import ModelConfig
from chatterbox.model.weights import WeightsError

ID_SYNTAX = "owner/name[@revision][:path/in/repo]"
_HUB_ID = re.compile(r"(?P<repo_id>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^:@\s]+))?(?::(?P<filename>[^:@\s/][^:@\s]*))?")

# What each loader reads, so that fetching a 13B repo skips its other formats and extras.
MODEL_CONFIG = ["config.json"]
SAFETENSORS_WEIGHTS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
PICKLE_WEIGHTS = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]
# AutoTokenizer falls back to config.json for the tokenizer class.
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "config.json"]
EXPORT_FILES = ["config.yaml", "export.json", "tokenizer/*", "*.safetensors", "model.safetensors.index.json"]


@dataclass(frozen=True)
class HubId:
    """A parsed ``owner/name[@revision][:path/in/repo]``."""

    repo_id: str
    revision: str | None = None
    filename: str | None = None


def parse_hub_id(value: str) -> HubId | None:
    """The Hub id ``value`` spells (``ID_SYNTAX``), or None when it is not one."""
    match = _HUB_ID.fullmatch(value)
    if match is None:
        return None
    try:
        validate_repo_id(match["repo_id"])
    except HFValidationError:
        return None
    return HubId(match["repo_id"], match["revision"], match["filename"])


def hub_repo_of(value: str) -> str | None:
    """The repo a configured weight value fetches from (None for a local path or an empty value)."""
    if not value or Path(value).exists():
        return None
    hub_id = parse_hub_id(value)
    return hub_id.repo_id if hub_id else None


def _hub_id_or_error(value: str, key: str) -> HubId:
    hub_id = parse_hub_id(value)
    if hub_id is None:
        raise WeightsError(f"{key}={value!r}: no such local path, and not a Hub id ({ID_SYNTAX})")
    return hub_id


def _why_not_fetched(error: Exception, hub_id: HubId) -> str:
    if isinstance(error, RevisionNotFoundError):
        return f"the Hub repo {hub_id.repo_id} has no revision {hub_id.revision!r}"
    if isinstance(error, RemoteEntryNotFoundError):
        return f"the Hub repo {hub_id.repo_id} has no file {hub_id.filename!r}"
    if isinstance(error, GatedRepoError):
        return f"the Hub repo {hub_id.repo_id} is gated (accept its terms on the Hub, then `hf auth login`)"
    if isinstance(error, RepositoryNotFoundError):
        return f"no Hub repo {hub_id.repo_id} (or a private one: `hf auth login`)"
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        reason = "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else "the Hub could not be reached"
        held = "only partly" if isinstance(error, IncompleteSnapshotError) else "not"
        return f"{held} in the Hub cache {constants.HF_HUB_CACHE} ({reason})"
    return f"the Hub request failed ({type(error).__name__}: {str(error).splitlines()[0]})"


def _fetch(hub_id: HubId, value: str, key: str, allow_patterns: list[str] | None = None) -> Path:
    # Offline, ask the cache only: given a commit, huggingface_hub would otherwise try to list the repo's files
    # unless its cache kept that listing (older huggingface_hub versions did not keep it).
    cache_only = constants.is_offline_mode()
    try:
        if hub_id.filename:
            return Path(hf_hub_download(hub_id.repo_id, hub_id.filename, revision=hub_id.revision,
                                        local_files_only=cache_only))
        return Path(snapshot_download(hub_id.repo_id, revision=hub_id.revision, allow_patterns=allow_patterns,
                                      local_files_only=cache_only))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.HTTPError) as error:
        raise WeightsError(f"{key}={value!r}: no such local path, and {_why_not_fetched(error, hub_id)}") from None


def _folder_id(value: str, key: str) -> HubId:
    hub_id = _hub_id_or_error(value, key)
    if hub_id.filename:
        raise WeightsError(f"{key}={value!r}: names one file of a Hub repo, but {key} is a folder "
                           "(owner/name[@revision])")
    return hub_id


def resolve_folder(value: str, key: str, allow_patterns: list[str] | None = None) -> Path:
    """``value`` itself when it exists, else the snapshot of the Hub repo it names (``allow_patterns`` of it)."""
    if Path(value).exists():
        return Path(value)
    return _fetch(_folder_id(value, key), value, key, allow_patterns)


def resolve_model_folder(value: str, key: str) -> Path:
    """An HF model folder (config.json + weights); from the Hub its safetensors, or its .bin files if it has none."""
    if Path(value).exists():
        return Path(value)
    hub_id = _folder_id(value, key)
    folder = _fetch(hub_id, value, key, MODEL_CONFIG + SAFETENSORS_WEIGHTS)
    if any(any(folder.glob(pattern)) for pattern in SAFETENSORS_WEIGHTS):
        return folder
    return _fetch(hub_id, value, key, MODEL_CONFIG + PICKLE_WEIGHTS)


def resolve_file(value: str, key: str) -> Path:
    """``value`` itself when it exists, else the file ``owner/name[@revision]:path`` of a Hub repo."""
    if Path(value).exists():
        return Path(value)
    hub_id = _hub_id_or_error(value, key)
    if not hub_id.filename:
        raise WeightsError(f"{key}={value!r}: {key} is one file; a Hub id names it as "
                           "owner/name[@revision]:path/in/repo")
    return _fetch(hub_id, value, key)


# ---------------------------------------------------------------------------------------------------
# model card
_PART_NAMES = {"llm": "language model (LLaVA-LLaMA-2)", "clip": "CLIP vision tower",
               "vision": "GroundingDINO vision branch"}


def model_card(cfg: ModelConfig, base_weights: dict[str, str], lineage: dict[str, str], merged_lora: bool) -> ModelCard:
    """The README.md of an export: Hub metadata, what the model is, where its weights are, how to load it.

    ``base_weights``: the paths the export reads its base parts from (empty: stored in the export);
    ``lineage``: the paths the model was built from, whose Hub repos become ``base_model``.
    """
    base_models = sorted({repo for repo in map(hub_repo_of, lineage.values()) if repo})
    data = ModelCardData(library_name="chatterbox", license="other", pipeline_tag="image-text-to-text",
                         tags=["chatterbox", "llava", "grounding-dino", "referring-expression", "visual-grounding",
                               "multimodal"],
                         base_model=base_models or None)
    lang = cfg.language
    sources = "\n".join(
        f"* {part}: " + (f"`{base_weights[key]}`" if base_weights[key] else "stored in this export")
        for key, part in _PART_NAMES.items())
    held = ("every weight not referenced below, LoRA merged into the language model" if merged_lora else
            "the trained weights and every part not referenced below")
    body = f"""
# ChatterBox

A [ChatterBox](https://arxiv.org/abs/2401.13307) model for multi-round multimodal referring and grounding:
a LLaVA-LLaMA-2 language model ({lang.num_hidden_layers} layers, hidden size {lang.hidden_size}), a CLIP ViT
vision tower, a region encoder that reads `<bbox>` regions, and a GroundingDINO branch that answers each
`[VG]` token with a box.

## Files
* `config.yaml`: the model config; `export.json`: the export format and the base-weight paths;
* `model.safetensors`, or shards listed in `model.safetensors.index.json`: {held};
* `tokenizer/`: the LLaMA tokenizer with ChatterBox's tokens.

## Base weights
{sources}

Hub ids are fetched into the Hub cache when the model is loaded; a local path must exist on the loading machine.

## Use
```python
import torch
from chatterbox import ChatterBox

model = ChatterBox.from_pretrained("<owner>/<name>", dtype=torch.bfloat16, device="cuda")  # this repo's id
chat = model.chat_session("photo.jpg")
print(chat.ask("Where is the cup? [VG]").boxes_xyxy_abs)
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
