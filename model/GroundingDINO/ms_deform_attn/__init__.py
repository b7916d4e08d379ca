"""Multi-scale deformable attention (Deformable-DETR / GroundingDINO): CUDA kernel + PyTorch path.

    from model.GroundingDINO.ms_deform_attn import ms_deform_attn, MultiScaleDeformableAttention
"""
from .module import MultiScaleDeformableAttention
from .op import kernel_status, ms_deform_attn, uses_cuda_kernel
from .pytorch_ref import ms_deform_attn_pytorch

__all__ = ["MultiScaleDeformableAttention", "kernel_status", "ms_deform_attn", "ms_deform_attn_pytorch",
           "uses_cuda_kernel"]
