"""Helpers shared by tests/test_data_*.py: one synthetic corpus per test session."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from chatterbox.data.config import DataConfig
from chatterbox.data.synthetic import SyntheticCorpus, write_corpus


@functools.lru_cache(maxsize=None)
def synthetic_corpus() -> SyntheticCorpus:
    root = Path(tempfile.mkdtemp(prefix="chatterbox_synth_"))
    atexit.register(shutil.rmtree, root, True)
    return write_corpus(root / "data", num_images=24, seed=0)


def synthetic_data_config(**overrides) -> DataConfig:
    cfg = DataConfig()
    for key, value in synthetic_corpus().data_paths().items():
        setattr(cfg.paths, key, value)
    cfg.paths.jsonl_files = [str(synthetic_corpus().jsonl_example)]
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def scene_boxes(image_path: str) -> set[tuple[int, int, int, int]]:
    """The true xyxy pixel boxes of the scene an image file was rendered from (matched by image id)."""
    stem = Path(image_path).stem
    image_id = int(stem.rsplit("_", 1)[-1])
    scene = next(s for s in synthetic_corpus().scenes if s.image_id == image_id)
    return {tuple(sh.box_xyxy_abs) for sh in scene.shapes}
