"""What every benchmark's JSON result starts with, and how it is written."""
from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

import torch


def machine_fields(device: torch.device) -> dict:
    """When and on what a result was measured."""
    import transformers

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__}


def write_json(path: str | Path, result) -> Path:
    """``result`` as indented JSON at ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def record_variant(variants: dict, name: str, entry: dict) -> None:
    """Keep one variant's entry and print it as a log line (the log shows results as they come)."""
    variants[name] = entry
    print(f"[{name}] {json.dumps(entry)}", flush=True)
