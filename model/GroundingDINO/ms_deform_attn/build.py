"""How the CUDA kernel is built: ahead of time by setup.py, or just in time on first use.

* ``pip install -e .`` (with nvcc and a CUDA torch) builds ``model.GroundingDINO.ms_deform_attn._C`` from
  :func:`extension_kwargs`.
* Otherwise :func:`jit_load` compiles the same sources with ``torch.utils.cpp_extension.load`` and caches
  the result under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes
  reuse the cached build. ``python -m model.GroundingDINO.ms_deform_attn.build`` does this eagerly.
"""
from __future__ import annotations

import os
from pathlib import Path

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
REPO_ROOT = CSRC_DIR.parents[3]
# Ahead-of-time build: the module lands inside the package as `_C`.
EXTENSION_NAME = "model.GroundingDINO.ms_deform_attn._C"
# Just-in-time build: a distinct name so a stale AOT build and the JIT cache never shadow each other.
JIT_EXTENSION_NAME = "chatterbox_ms_deform_attn"

CXX_FLAGS = ["-O3"]  # the C++ standard is the one torch asks for (C++20 for torch >= 2.13)
NVCC_FLAGS = [
    "-O3",
    "--expt-relaxed-constexpr",
    "-lineinfo",  # source lines in profiler output; no runtime cost
]


def source_files() -> list[Path]:
    """The .cpp/.cu translation units of the op, sorted for a stable build."""
    files = sorted(CSRC_DIR.glob("*.cpp")) + sorted(CSRC_DIR.glob("*.cu"))
    if not files:
        raise FileNotFoundError(f"model/GroundingDINO/ms_deform_attn/build.py: no sources under {CSRC_DIR}")
    return files


def extension_kwargs() -> dict:
    """Keyword arguments for ``torch.utils.cpp_extension.CUDAExtension`` (used by setup.py).

    Sources are given relative to the repository root, where setup.py runs.
    """
    return {
        "name": EXTENSION_NAME,
        "sources": [os.path.relpath(path, REPO_ROOT) for path in source_files()],
        "extra_compile_args": {"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
    }


def jit_load(verbose: bool = False):
    """Compile (or reuse the cached build of) the extension and return the loaded module."""
    from torch.utils.cpp_extension import load

    return load(
        name=JIT_EXTENSION_NAME,
        sources=[str(path) for path in source_files()],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        verbose=verbose,
    )


if __name__ == "__main__":
    module = jit_load(verbose=True)
    print(f"built {JIT_EXTENSION_NAME}: {module.__file__}")
