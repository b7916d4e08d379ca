"""The deformable-attention op: dispatch between the CUDA kernel and the PyTorch path.

On CUDA tensors the kernel is used when it can be loaded (the ahead-of-time build from setup.py, else a
just-in-time build cached under TORCH_EXTENSIONS_DIR) and has passed a small self-test against the
PyTorch path on that device. If any of that fails, one warning says why and the PyTorch path is used:
never a crash and never a silently wrong result. ``CHATTERBOX_MSDA_BACKEND=pytorch`` forces the
PyTorch path; ``=cuda`` makes an unavailable kernel an error instead of a warning.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

from .pytorch_ref import WHERE, check_shapes, ms_deform_attn_pytorch

BACKEND_ENV = "CHATTERBOX_MSDA_BACKEND"

_lock = threading.RLock()  # re-entrant: a checkpoint recompute may call the op while the lock is held
_extension = None            # the loaded extension module, once loaded
_load_error: str | None = None
_device_status: dict[int, str | None] = {}  # device index -> None (kernel verified) or the failure reason
_warned = False


def _backend_choice() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    if choice not in ("auto", "cuda", "pytorch"):
        raise ValueError(f"{WHERE}: {BACKEND_ENV} must be auto, cuda or pytorch, got {choice!r}")
    return choice


def _load_extension():
    """Import the AOT build, else JIT-compile; remember the outcome. Returns the module or None."""
    global _extension, _load_error
    if _extension is not None or _load_error is not None:
        return _extension
    try:
        from . import _C as extension  # built by `pip install -e .`
    except ImportError as aot_error:
        try:
            from .build import jit_load

            extension = jit_load()
        except Exception as jit_error:  # noqa: BLE001 - any build failure means "use the fallback"
            _load_error = (
                f"no prebuilt extension ({aot_error}) and the just-in-time build failed "
                f"({type(jit_error).__name__}: {str(jit_error).strip().splitlines()[-1] if str(jit_error).strip() else ''})"
            )
            return None
    _extension = extension
    return _extension


def _self_test(extension, device: torch.device) -> str | None:
    """Run forward and backward on a small random problem; None if both match the PyTorch path."""
    generator = torch.Generator(device="cpu").manual_seed(1234)
    shapes = torch.tensor([[3, 5], [2, 2], [1, 3]], dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    num_tokens = int((shapes[:, 0] * shapes[:, 1]).sum())
    n, num_queries, m, d, num_levels, num_points = 2, 3, 2, 8, 3, 2
    value = torch.randn(n, num_tokens, m, d, generator=generator)
    locations = torch.rand(n, num_queries, m, num_levels, num_points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(n, num_queries, m, num_levels, num_points, generator=generator)
    grad_out = torch.randn(n, num_queries, m * d, generator=generator)
    inputs = [t.to(device) for t in (value, shapes, starts, locations, weights)]
    try:
        out = extension.forward(*inputs, 0)
        grads = extension.backward(*inputs, grad_out.to(device), 0)
        torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - e.g. "no kernel image is available for this device"
        return f"the kernel failed on {device}: {type(error).__name__}: {error}"
    # The first call may come from inside torch.no_grad (inference) or a checkpointed forward, whose
    # saved-tensor hooks would turn this reference backward into a recomputation that re-enters the op:
    # compute the reference in an autograd context of its own.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        ref = ms_deform_attn_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
        ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    for name, got, want in zip(("output", "grad_value", "grad_locations", "grad_weights"),
                               (out, *grads), (ref, *ref_grads)):
        if not torch.allclose(got.cpu(), want.detach(), rtol=1e-3, atol=1e-4):
            return f"the kernel's {name} disagrees with the PyTorch path on {device} (self-test)"
    return None


def _verified_status(device: torch.device) -> str | None:
    """None if the kernel is loaded and passed its self-test on this CUDA device, else the reason it did
    not; the load and the self-test run once per device, the outcome is remembered."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _device_status:
            extension = _load_extension()
            _device_status[index] = _load_error if extension is None else _self_test(extension, device)
        return _device_status[index]


def _kernel_for(device: torch.device):
    """The verified extension for this CUDA device, or None (after warning once) to use PyTorch."""
    global _warned
    choice = _backend_choice()
    if choice == "pytorch":
        return None
    with _lock:
        reason = _verified_status(device)
        if reason is None:
            return _extension
        if choice == "cuda":
            raise RuntimeError(f"{WHERE}: CUDA kernel requested ({BACKEND_ENV}=cuda) but unavailable: {reason}")
        if not _warned:
            _warned = True
            warnings.warn(
                f"{WHERE}: CUDA kernel unavailable, using the slower PyTorch path instead. Reason: {reason}. "
                f"Build it with `pip install -e .` or `python -m model.GroundingDINO.ms_deform_attn.build`.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None


def kernel_status(device: torch.device | str = "cuda") -> str | None:
    """None if the CUDA kernel is usable on ``device``, else the reason it is not (loads it if needed)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    return _verified_status(device)


# The kernel as two torch.library operators with a registered autograd formula, so that torch.compile
# traces straight through the op (an autograd.Function calling the extension would split the compiled
# graph of every deformable-attention layer in two). Inputs are already contiguous, locations/weights fp32/fp64.
@torch.library.custom_op("chatterbox_msda::forward", mutates_args=())
def _kernel_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    return _extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, 0)


@_kernel_forward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, head_dim = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * head_dim))


@torch.library.custom_op("chatterbox_msda::backward", mutates_args=())
def _kernel_backward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                     grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_value, grad_locations, grad_weights = _extension.backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous(), 0)
    return grad_value, grad_locations, grad_weights


@_kernel_backward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _kernel_gradients(ctx, grad_output):
    grad_value, grad_locations, grad_weights = _kernel_backward(*ctx.saved_tensors, grad_output)
    return grad_value, None, None, grad_locations, grad_weights


_kernel_forward.register_autograd(_kernel_gradients, setup_context=_save_inputs)


@torch.compiler.assume_constant_result
def _use_kernel(device: torch.device) -> bool:
    """Whether ``device`` runs the kernel; a constant to torch.compile (the choice never changes)."""
    return device.type == "cuda" and _kernel_for(device) is not None


def uses_cuda_kernel(device: torch.device | str) -> bool:
    """Whether ms_deform_attn runs the CUDA kernel on ``device``. The PyTorch reference it falls back to
    reads the level layout on the host, so only the kernel can be captured in a CUDA graph."""
    return _use_kernel(torch.device(device))


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: [N, S, M, D] per-head values of all levels, flattened level by level.
        spatial_shapes: [L, 2] int64, (H, W) of each level.
        level_start_index: [L] int64, first token of each level in S.
        sampling_locations: [N, Lq, M, L, P, 2], (x, y) normalised to [0, 1]; outside is zero-padded.
        attention_weights: [N, Lq, M, L, P].
    Returns:
        [N, Lq, M*D] in value's dtype.

    fp16/bf16 values are handled natively by the kernel (fp32 accumulation); sampling locations and
    weights are kept in fp32 (fp64 for fp64 values) so sampling positions stay exact.
    """
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _use_kernel(value.device):
        coord_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        return _kernel_forward(
            value.contiguous(),
            spatial_shapes.contiguous(),
            level_start_index.contiguous(),
            sampling_locations.to(coord_dtype).contiguous(),
            attention_weights.to(coord_dtype).contiguous(),
        )
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
