"""Install ChatterBox (`pip install -e .`).

Packages: `chatterbox` (the model users import) and `model.GroundingDINO` (the vision branch, kept at
upstream's path). The deformable-attention CUDA kernel is built here when a CUDA toolchain is present;
otherwise it is compiled on first use, or the PyTorch path is used (see model/GroundingDINO/ms_deform_attn).
"""
import os

from setuptools import find_packages, setup


def _cuda_extensions():
    """The CUDA op as a build extension, only where nvcc and a CUDA torch are both available."""
    if os.environ.get("CHATTERBOX_SKIP_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or not torch.cuda.is_available():
        return [], {}
    from model.GroundingDINO.ms_deform_attn.build import extension_kwargs

    ext = CUDAExtension(**extension_kwargs())
    return [ext], {"build_ext": BuildExtension}


def _read_requirements():
    with open(os.path.join(os.path.dirname(__file__), "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="chatterbox",
    version="0.1.0",
    description="ChatterBox: multi-round multimodal referring and grounding (arXiv 2401.13307)",
    python_requires=">=3.11",
    packages=find_packages(include=["chatterbox", "chatterbox.*", "model", "model.*"]),
    package_data={
        "model.GroundingDINO.ms_deform_attn": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h"],
        "chatterbox.serve": ["static/*.html"],
    },
    install_requires=_read_requirements(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
