"""Load the public GroundingDINO weights (groundingdino_swinb_cogcoor.pth, groundingdino_swint_ogc.pth) and
ChatterBox vision-branch state dicts into a VisionBranch.

Rules (spec/checkpoints/README.md, groundingdino_key_diff.json):
* the file is read with ``torch.load(weights_only=True)``; a ``model`` wrapper and a ``module.`` prefix
  are accepted;
* ``bert.*``, ``feat_map.*`` and ``label_enc.*`` (the BERT text side ChatterBox replaces) are ignored;
* ``transformer.tgt_embed.weight`` is dropped on purpose by default (ChatterBox re-learns the content
  queries), so it keeps its fresh initialisation;
* every other missing or unexpected key, and every shape mismatch, is an error naming the keys;
* tensors are cast to the dtype of the parameter they fill (upstream stores some LayerNorms in fp16).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointError", "LoadReport", "IGNORED_PREFIXES", "DROPPED_KEYS", "read_state_dict",
           "check_state_dict_layout", "load_vision_state_dict", "load_groundingdino_checkpoint"]

IGNORED_PREFIXES = ("bert.", "feat_map.", "label_enc.")
DROPPED_KEYS = ("transformer.tgt_embed.weight",)
_MAX_NAMED = 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the vision branch."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)     # present in the file, deliberately not loaded
    ignored: list[str] = field(default_factory=list)     # text-side keys of the official file
    not_loaded: list[str] = field(default_factory=list)  # model keys left at their initialisation


def _names(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_NAMED])
    return shown + (f", ... ({len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return its flat state dict (``model`` unwrapped, ``module.`` stripped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GroundingDINO checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(f"GroundingDINO checkpoint {path}: cannot be read as a PyTorch checkpoint "
                              f"(truncated, corrupted or not a checkpoint file?): {type(err).__name__}: {err}") from err
    return unwrap_state_dict(payload, source=str(path))


def unwrap_state_dict(payload, source: str = "state dict") -> dict[str, torch.Tensor]:
    if isinstance(payload, dict) and "model" in payload and isinstance(payload["model"], dict):
        payload = payload["model"]
    if not isinstance(payload, dict) or not payload:
        raise CheckpointError(f"{source}: expected a non-empty mapping of parameter names to tensors "
                              f"(optionally under 'model'), got {type(payload).__name__}")
    bad = [k for k, v in payload.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not name -> tensor: {_names(map(str, bad))}")
    if all(k.startswith("module.") for k in payload):
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return payload


def _split(state_dict: dict[str, torch.Tensor], drop_tgt_embed: bool):
    ignored = [k for k in state_dict if k.startswith(IGNORED_PREFIXES)]
    dropped = [k for k in state_dict if drop_tgt_embed and k in DROPPED_KEYS]
    kept = {k: v for k, v in state_dict.items() if k not in set(ignored) | set(dropped)}
    return kept, ignored, dropped


def check_state_dict_layout(model: nn.Module, state_dict: dict[str, torch.Tensor], drop_tgt_embed: bool = True,
                            source: str = "state dict") -> LoadReport:
    """Names and shapes only (works with meta tensors): raise CheckpointError naming every missing or
    unexpected key and every shape mismatch; return what would be loaded, dropped and ignored."""
    kept, ignored, dropped = _split(state_dict, drop_tgt_embed)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    allowed_missing = set(DROPPED_KEYS) if drop_tgt_embed else set()
    missing = set(expected) - set(kept) - allowed_missing
    unexpected = set(kept) - set(expected)
    mismatched = [f"{k}: checkpoint {tuple(kept[k].shape)} vs model {expected[k]}"
                  for k in sorted(set(kept) & set(expected)) if tuple(kept[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:_MAX_NAMED]))
    if problems:
        raise CheckpointError(f"{source} does not fit the vision branch: " + " | ".join(problems))
    return LoadReport(loaded=sorted(kept), dropped=sorted(dropped), ignored=sorted(ignored),
                      not_loaded=sorted(set(expected) - set(kept)))


def _shared_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that refer to one tensor (the shared box head is listed under 12 names)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_vision_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], drop_tgt_embed: bool = True,
                           source: str = "state dict") -> LoadReport:
    """Check the layout strictly, then copy the tensors into ``model`` (cast to each parameter's dtype)."""
    state_dict = unwrap_state_dict(state_dict, source)
    report = check_state_dict_layout(model, state_dict, drop_tgt_embed, source)
    kept, _, _ = _split(state_dict, drop_tgt_embed)
    for names in _shared_groups(model):
        present = [n for n in names if n in kept]
        first = present[0] if present else None
        for other in present[1:]:
            if not kept[other].is_meta and not torch.equal(kept[first], kept[other]):
                raise CheckpointError(f"{source}: {first} and {other} are one shared tensor in the model but "
                                      "differ in the checkpoint")
    targets = model.state_dict()
    for name, tensor in kept.items():
        target = targets[name]
        if not target.is_floating_point():
            if not tensor.is_meta and not target.is_meta and not torch.equal(tensor.to(target.device), target):
                raise CheckpointError(f"{source}: buffer {name} differs from the one this architecture computes "
                                      "(wrong window size or backbone?)")
        else:
            kept[name] = tensor.to(dtype=target.dtype)
    result = model.load_state_dict(kept, strict=False)
    if set(result.missing_keys) != set(report.not_loaded) or result.unexpected_keys:
        raise CheckpointError(f"{source}: load_state_dict disagreed with the layout check: missing "
                              f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    return report


def load_groundingdino_checkpoint(model: nn.Module, path: str | Path, drop_tgt_embed: bool = True) -> LoadReport:
    """Load an official GroundingDINO .pth (or a saved vision-branch state dict) into ``model``."""
    return load_vision_state_dict(model, read_state_dict(path), drop_tgt_embed, source=f"checkpoint {path}")
