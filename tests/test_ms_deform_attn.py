"""Multi-scale deformable attention: PyTorch path vs a naive per-point loop, the module, the CUDA kernel.

CPU tests use tiny shapes; GPU tests (marked `gpu`) check the kernel against a float64 reference.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from model.GroundingDINO.ms_deform_attn import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_pytorch
from model.GroundingDINO.ms_deform_attn import op as msda_op


def make_problem(level_shapes, batch=2, queries=3, heads=2, head_dim=3, points=2, dtype=torch.float64,
                 device="cpu", seed=0, spread=0.3):
    """Random inputs; locations fall up to `spread` outside [0, 1] so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(level_shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=g, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=torch.float64)
    locations = locations * (1 + 2 * spread) - spread
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=torch.float64)
    to = dict(device=device)
    return (value.to(dtype=dtype, **to), spatial_shapes.to(**to), level_start_index.to(**to),
            locations.to(dtype=dtype, **to), weights.to(dtype=dtype, **to))


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights):
    """One point and one corner at a time with the bilinear tent 1-|d| (differentiable in everything)."""
    n_batch, _, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = locations.shape
    rows = []
    for n in range(n_batch):
        for q in range(n_queries):
            heads = []
            for m in range(n_heads):
                acc = value.new_zeros(head_dim)
                for level in range(n_levels):
                    h, w = (int(v) for v in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for p in range(n_points):
                        col = locations[n, q, m, level, p, 0] * w - 0.5  # pixel centres at k + 0.5
                        row = locations[n, q, m, level, p, 1] * h - 0.5
                        c0, r0 = math.floor(col.item()), math.floor(row.item())
                        for r, c in ((r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)):
                            if 0 <= r < h and 0 <= c < w:
                                tent = (1 - (row - r).abs()) * (1 - (col - c).abs())
                                acc = acc + weights[n, q, m, level, p] * tent * value[n, start + r * w + c, m]
                heads.append(acc)
            rows.append(torch.cat(heads))
    return torch.stack(rows).view(n_batch, n_queries, n_heads * head_dim)


LEVELS = [[3, 4], [2, 5], [1, 1]]  # non-square, and a 1x1 level


def test_pytorch_path_matches_naive_loop():
    inputs = make_problem(LEVELS, seed=1)
    got = ms_deform_attn_pytorch(*inputs)
    want = naive_ms_deform_attn(*inputs)
    assert got.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Points well outside every map contribute nothing.
    value, shapes, starts, locations, weights = inputs
    far = torch.full_like(locations, 3.0)
    assert ms_deform_attn_pytorch(value, shapes, starts, far, weights).abs().max() == 0


def test_pytorch_path_gradients_match_naive_loop():
    value, shapes, starts, locations, weights = make_problem(LEVELS, batch=1, queries=2, seed=2)
    grad_out = torch.randn(1, 2, 6, dtype=torch.float64)
    grads = []
    for fn in (ms_deform_attn_pytorch, naive_ms_deform_attn):
        leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_pytorch_path_gradcheck():
    value, shapes, starts, locations, weights = make_problem([[2, 3], [1, 2]], batch=1, queries=2, heads=1,
                                                             head_dim=2, seed=3)
    leaves = [t.requires_grad_(True) for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_pytorch(v, shapes, starts, loc, w), leaves)


def test_dispatch_on_cpu_uses_pytorch_path_without_warning():
    inputs = make_problem(LEVELS, dtype=torch.float32, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))


def test_bf16_values_with_fp32_locations():
    value, shapes, starts, locations, weights = make_problem(LEVELS, dtype=torch.float32, seed=5)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, locations, weights)
    assert out.dtype == torch.bfloat16
    want = ms_deform_attn_pytorch(value.bfloat16().double(), shapes, starts, locations.double(), weights.double())
    assert ((out.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, a[0][:, :, :, :1].squeeze(-1)), "value must be [N,S,M,D]"),
        (lambda a: a.__setitem__(1, a[1].int()), "must be int64"),
        (lambda a: a.__setitem__(3, a[3][..., :1]), "sampling_locations must be"),
        (lambda a: a.__setitem__(4, a[4][:, :1]), "attention_weights must be"),
        (lambda a: a.__setitem__(2, a[2] + 30), "does not fit in value"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, message):
    args = list(make_problem(LEVELS, dtype=torch.float32, seed=6))
    mutate(args)
    with pytest.raises(ValueError, match="ms_deform_attn") as info:
        ms_deform_attn(*args)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------- module

def test_module_parameters_match_checkpoint_layout():
    module = MultiScaleDeformableAttention(embed_dim=256, num_heads=8, num_levels=4, num_points=4)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {  # transformer.encoder.layers.*.self_attn.* in groundingdino_chatterbox_swinb.json
        "sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256), "value_proj.bias": (256,),
        "output_proj.weight": (256, 256), "output_proj.bias": (256,),
    }


def test_module_init_matches_upstream():
    heads, levels, points = 8, 4, 4
    module = MultiScaleDeformableAttention(256, heads, levels, points)
    assert module.sampling_offsets.weight.abs().max() == 0
    assert module.attention_weights.weight.abs().max() == 0 and module.attention_weights.bias.abs().max() == 0
    assert module.value_proj.bias.abs().max() == 0 and module.output_proj.bias.abs().max() == 0
    bound = math.sqrt(6 / (256 + 256))  # xavier_uniform
    assert module.value_proj.weight.abs().max() <= bound and module.value_proj.weight.std() > bound / 3
    bias = module.sampling_offsets.bias.view(heads, levels, points, 2)
    expected_directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                                       dtype=torch.float32)
    for p in range(points):
        for level in range(levels):
            torch.testing.assert_close(bias[:, level, p], expected_directions * (p + 1), atol=1e-5, rtol=0)


def _module_problem(num_levels=2, seed=7):
    g = torch.Generator().manual_seed(seed)
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=num_levels, num_points=3)
    with torch.no_grad():  # non-trivial offsets and weights
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    shapes = torch.tensor([[4, 3], [2, 2]][:num_levels], dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    query = torch.randn(2, 5, 16, generator=g)
    value = torch.randn(2, int(sizes.sum()), 16, generator=g)
    return module, query, value, shapes, starts, g


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_forward_matches_spec(ref_dim):
    module, query, value, shapes, starts, g = _module_problem()
    query_pos = torch.randn(query.shape, generator=g)
    ref = torch.rand(2, 5, 2, ref_dim, generator=g)
    out = module(query, value, ref, shapes, starts, query_pos=query_pos)
    assert out.shape == (2, 5, 16)

    q = query + query_pos
    offsets = module.sampling_offsets(q).view(2, 5, 2, 2, 3, 2)
    weights = module.attention_weights(q).view(2, 5, 2, 6).softmax(-1).view(2, 5, 2, 2, 3)
    if ref_dim == 2:
        wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()  # offsets are in cells of each level
        locations = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    else:  # offsets scaled by half the box size, divided by the number of points
        locations = ref[:, :, None, :, None, :2] + offsets / 3 * ref[:, :, None, :, None, 2:] * 0.5
    v = module.value_proj(value).view(2, -1, 2, 8)
    sampled = naive_ms_deform_attn(v.double(), shapes, starts, locations.double(), weights.double())
    torch.testing.assert_close(out, module.output_proj(sampled.float()), rtol=1e-4, atol=1e-5)


def test_module_padding_mask_hides_values():
    module, query, value, shapes, starts, g = _module_problem()
    ref = torch.rand(2, 5, 2, 2, generator=g)
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[0, -3:] = True
    mask[1, :2] = True
    out = module(query, value, ref, shapes, starts, value_padding_mask=mask)
    changed = value.clone()
    changed[mask] = 1e3
    torch.testing.assert_close(module(query, changed, ref, shapes, starts, value_padding_mask=mask), out)
    assert not torch.allclose(module(query, changed, ref, shapes, starts), out)


def test_module_gradients_flow():
    module, query, value, shapes, starts, g = _module_problem()
    query.requires_grad_(True)
    ref = torch.rand(2, 5, 2, 4, generator=g)
    module(query, value, ref, shapes, starts).square().sum().backward()
    assert query.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_rejects_wrong_reference_points():
    module, query, value, shapes, starts, _ = _module_problem()
    with pytest.raises(ValueError, match="reference_points"):
        module(query, value, torch.rand(2, 5, 2, 3), shapes, starts)
    with pytest.raises(ValueError, match="levels"):
        module(query, value, torch.rand(2, 5, 1, 2), shapes[:1], starts[:1])


# ------------------------------------------------------------------------------------------------- GPU

def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _kernel():
    reason = msda_op.kernel_status("cuda")
    if reason is not None:
        pytest.fail(f"CUDA kernel unavailable: {reason}")
    return msda_op._extension


def _reference_and_grads(value, shapes, starts, locations, weights, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in (value, locations, weights)]
    out = ms_deform_attn_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (out, *torch.autograd.grad(out, leaves, grad_out.double()))


GPU_CASES = [  # level shapes, batch, queries, heads, head_dim, points
    ([[64, 64], [32, 32], [16, 16], [8, 8]], 2, 300, 8, 32, 4),
    ([[13, 21], [7, 11], [4, 6], [2, 3]], 1, 77, 8, 32, 4),   # non-square, batch 1
    ([[5, 9], [3, 1]], 3, 17, 3, 5, 3),                         # odd head_dim and heads
    ([[10, 7]], 1, 1, 1, 1, 1),
    ([[6, 6], [3, 3], [2, 2]], 2, 33, 2, 96, 2),                # several channel chunks per lane
    ([[9, 4], [5, 2], [3, 1]], 5, 41, 4, 16, 5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_kernel_matches_float64_reference(case, dtype, tol):
    extension = _kernel()
    level_shapes, batch, queries, heads, head_dim, points = GPU_CASES[case]
    value, shapes, starts, locations, weights = make_problem(
        level_shapes, batch, queries, heads, head_dim, points, dtype=torch.float32, device="cuda", seed=case)
    value = value.to(dtype)
    grad_out = torch.randn(batch, queries, heads * head_dim, device="cuda").to(dtype)
    ref = _reference_and_grads(value, shapes, starts, locations, weights, grad_out)
    widths = [w for w in (1, 2, 4, 8) if head_dim % w == 0 and w * value.element_size() <= 16]
    for width in [0] + widths:
        out = extension.forward(value, shapes, starts, locations, weights, width)
        grads = extension.backward(value, shapes, starts, locations, weights, grad_out, width)
        assert out.dtype == dtype and grads[0].dtype == dtype
        for name, got, want in zip(("output", "grad_value", "grad_locations", "grad_weights"), (out, *grads), ref):
            assert torch.isfinite(got).all(), (name, width)
            assert _rel_err(got, want) <= tol, (name, width, _rel_err(got, want))


@pytest.mark.gpu
def test_kernel_through_autograd_and_misaligned_views():
    _kernel()
    value, shapes, starts, locations, weights = make_problem([[7, 5], [3, 4]], 2, 9, 4, 8, 3, dtype=torch.float32,
                                                             device="cuda", seed=11)
    # A contiguous view at an odd element offset cannot use packed loads: the kernel must notice.
    storage = torch.randn(value.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(value).copy_(value)
    leaves = [t.clone().requires_grad_(True) for t in (shifted, locations, weights)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref = _reference_and_grads(value, shapes, starts, locations, weights, grad_out)
    for got, want in zip((out, *grads), ref):
        assert _rel_err(got, want) <= 1e-5


@pytest.mark.gpu
def test_kernel_gradcheck_float64():
    _kernel()
    value, shapes, starts, locations, weights = make_problem([[3, 4], [2, 3]], 2, 3, 2, 4, 2, device="cuda", seed=12)
    leaves = [t.requires_grad_(True) for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w), leaves)


@pytest.mark.gpu
def test_random_shapes_agree_with_reference():
    extension = _kernel()
    g = torch.Generator().manual_seed(13)
    for trial in range(12):
        pick = lambda hi: int(torch.randint(1, hi + 1, (1,), generator=g))  # noqa: E731
        level_shapes = [[pick(20), pick(20)] for _ in range(pick(4))]
        head_dim = [1, 3, 8, 32, 64][trial % 5]
        inputs = make_problem(level_shapes, pick(3), pick(50), pick(8), head_dim, pick(4), dtype=torch.float32,
                              device="cuda", seed=100 + trial, spread=0.5)
        grad_out = torch.randn(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * head_dim, device="cuda")
        ref = _reference_and_grads(*inputs, grad_out)
        got = (extension.forward(*inputs, 0), *extension.backward(*inputs, grad_out, 0))
        for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, ref):
            assert _rel_err(a, b) <= 1e-5, (trial, level_shapes, head_dim, name, _rel_err(a, b))


@pytest.mark.gpu
def test_module_on_gpu_bf16_matches_fp32():
    _kernel()
    module, query, value, shapes, starts, g = _module_problem()
    ref = torch.rand(2, 5, 2, 4, generator=g)
    module = module.cuda()
    args = [t.cuda() for t in (query, value, ref, shapes, starts)]
    want = module(*args)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = module(*args)
    assert _rel_err(got, want) < 3e-2


@pytest.mark.gpu
def test_unavailable_kernel_warns_once_and_falls_back(monkeypatch):
    index = torch.cuda.current_device()
    monkeypatch.setattr(msda_op, "_device_status", {index: "simulated build failure"})
    monkeypatch.setattr(msda_op, "_warned", False)
    inputs = make_problem(LEVELS, dtype=torch.float32, device="cuda", seed=14)
    with pytest.warns(RuntimeWarning, match="simulated build failure"):
        out = ms_deform_attn(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    monkeypatch.setenv(msda_op.BACKEND_ENV, "cuda")
    with pytest.raises(RuntimeError, match="simulated build failure"):
        ms_deform_attn(*inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("context", ["no_grad", "checkpoint"])
def test_first_call_from_inference_or_a_checkpointed_forward(context, monkeypatch):
    """The kernel's one-time self-test must work wherever the first call happens (no hang, no error)."""
    import torch.utils.checkpoint

    from model.GroundingDINO.ms_deform_attn import op

    monkeypatch.setattr(op, "_device_status", {})  # force the self-test to run again here
    shapes = torch.tensor([[4, 6], [2, 3]], dtype=torch.int64, device="cuda")
    starts = torch.tensor([0, 24], dtype=torch.int64, device="cuda")
    value = torch.randn(1, 30, 2, 8, device="cuda", requires_grad=True)
    locations = torch.rand(1, 5, 2, 2, 2, 2, device="cuda")
    weights = torch.rand(1, 5, 2, 2, 2, device="cuda")
    if context == "no_grad":
        with torch.no_grad():
            out = op.ms_deform_attn(value, shapes, starts, locations, weights)
    else:
        out = torch.utils.checkpoint.checkpoint(op.ms_deform_attn, value, shapes, starts, locations, weights,
                                                use_reentrant=False)
        out.sum().backward()
        assert value.grad is not None
    assert op._device_status[torch.cuda.current_device()] is None
    ref = ms_deform_attn_pytorch(value.detach(), shapes, starts, locations, weights)
    assert torch.allclose(out.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_kernel_operators_pass_opcheck_and_compile_without_graph_breaks():
    """The kernel is a torch.library operator pair with an autograd formula: torch.compile traces a whole
    deformable-attention module in one graph (fullgraph) and gives the eager values and gradients."""
    _kernel()
    value, shapes, starts, locations, weights = make_problem([[6, 5], [3, 3]], 2, 7, 2, 8, 2, dtype=torch.float32,
                                                             device="cuda", seed=15)
    torch.library.opcheck(msda_op._kernel_forward, (value, shapes, starts, locations, weights))
    grad_out = torch.randn(2, 7, 16, device="cuda")
    torch.library.opcheck(msda_op._kernel_backward, (value, shapes, starts, locations, weights, grad_out))

    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=2, num_points=2).cuda()
    query, memory, reference = torch.randn(2, 7, 32, device="cuda"), torch.randn(2, 39, 32, device="cuda"), \
        torch.rand(2, 7, 2, 2, device="cuda")
    level_shapes = torch.tensor([[6, 5], [3, 3]], device="cuda")
    level_starts = torch.tensor([0, 30], device="cuda")
    results = []
    for compiled in (False, True):
        module.zero_grad(set_to_none=True)
        call = torch.compile(module, fullgraph=True, dynamic=False) if compiled else module
        out = call(query, memory, reference, level_shapes, level_starts, None)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in module.parameters()]))
    (eager, eager_grads), (compiled_out, compiled_grads) = results
    torch.testing.assert_close(compiled_out, eager, rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
