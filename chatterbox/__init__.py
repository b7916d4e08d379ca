"""ChatterBox: multi-round multimodal referring and grounding (arXiv 2401.13307).

`from chatterbox import ChatterBox` gives the model class; it is imported lazily so that light users
(configs, tokens, metrics, data readers) do not pay for torch/transformers model imports.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ChatterBox": ("chatterbox.model.chatterbox", "ChatterBox"),
    "load_config": ("chatterbox.config", "load_config"),
    "ChatterBoxConfig": ("chatterbox.config", "ChatterBoxConfig"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'chatterbox' has no attribute {name!r}")


__all__ = list(_LAZY)
