"""Shared test setup: offline, one thread, a tiny tokenizer, GPU tests skipped without CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny_upstream_policy():
    """The tiny preset's model (configs/tiny_stage1.yaml) under upstream's training policy and image layout:
    CLIP, the base LLM and Swin frozen (the quickstart trains them, since its weights start random), and
    upstream's 16x16 patch grid, 256 image tokens (the preset has 8x8), which the hand-built prompts spell out."""
    from chatterbox.model.presets import preset

    cfg = preset("tiny")
    cfg.clip.freeze = cfg.language.freeze_base = cfg.vision.freeze_backbone = True
    cfg.clip.patch_size = cfg.clip.image_size // 16
    return cfg


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``bench/<script>`` with this interpreter from the repository root; it must succeed (the
    assertion shows the end of its output)."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(autouse=True)
def no_inherited_rendezvous_port():
    """An in-process training test leaves this process's rendezvous store listening on MASTER_PORT; a
    script started later must not inherit the variable and try to bind the same port."""
    yield
    os.environ.pop("MASTER_PORT", None)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from chatterbox.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture()
def tiny_tokenizer(tiny_tokenizer_dir):
    """A fresh LLaMA tokenizer with ChatterBox's tokens added (fresh per test: tests may mutate it)."""
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def module_tokenizer(tiny_tokenizer_dir):
    """One tokenizer shared by a module's tests (for modules that build one model for all their tests)."""
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))
