#!/usr/bin/env python
"""Benchmark the multi-scale deformable attention op at GroundingDINO shapes (needs a CUDA GPU).

Times forward and forward+backward (median of CUDA-event timings) for: our kernel in fp32 and bf16 (and
each channels-per-thread width, to justify the default), upstream's Deformable-DETR kernel (built from
a copy of its source kept outside git, fp32, im2col_step 64), the PyTorch path and the PyTorch path under
torch.compile. Reports achieved bandwidth against the bytes the op must move:

  forward  = value (N*S*M*D*e) + locations (N*Lq*M*L*P*2*4) + weights (N*Lq*M*L*P*4) + output (N*Lq*M*D*e)
  backward = value + locations + weights + grad_output (N*Lq*M*D*e)
             + grad_value (N*S*M*D*e) + grad_locations + grad_weights
  fwd+bwd  = forward + backward, with e = bytes per value element (4 fp32, 2 bf16); locations and
             weights stay fp32 in every variant.

Usage: python bench/bench_ms_deform_attn.py [--upstream-src DIR] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.GroundingDINO.ms_deform_attn import ms_deform_attn_pytorch  # noqa: E402
from model.GroundingDINO.ms_deform_attn import op as msda_op  # noqa: E402

INPUTS = {  # level shapes (H, W) of GroundingDINO's 4 levels (strides 8/16/32/64)
    "512x512": [[64, 64], [32, 32], [16, 16], [8, 8]],
    "800x1333": [[100, 167], [50, 84], [25, 42], [13, 21]],
}
HEADS, HEAD_DIM, POINTS = 8, 32, 4


def make_inputs(level_shapes, batch, queries, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = torch.tensor(level_shapes, dtype=torch.int64, device="cuda")
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(level_shapes)
    value = torch.randn(batch, int(sizes.sum()), HEADS, HEAD_DIM, device="cuda", generator=g).to(dtype)
    # Reference points anywhere in the image plus offsets of a few cells, some falling outside.
    locations = torch.rand(batch, queries, HEADS, levels, POINTS, 2, device="cuda", generator=g) * 1.1 - 0.05
    weights = torch.rand(batch, queries, HEADS, levels, POINTS, device="cuda", generator=g)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    grad_out = torch.randn(batch, queries, HEADS * HEAD_DIM, device="cuda", generator=g).to(dtype)
    return value, shapes, starts, locations, weights, grad_out


def bytes_moved(batch, tokens, queries, levels, element_size):
    value = batch * tokens * HEADS * HEAD_DIM * element_size
    out = batch * queries * HEADS * HEAD_DIM * element_size
    loc = batch * queries * HEADS * levels * POINTS * 2 * 4
    attn = batch * queries * HEADS * levels * POINTS * 4
    forward = value + loc + attn + out
    backward = value + loc + attn + out + value + loc + attn
    return forward, forward + backward


def time_ms(fn, min_reps=10, max_seconds=1.0):
    """Median milliseconds of fn() over CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < 200):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def load_upstream(src_dir: Path):
    from torch.utils.cpp_extension import load

    sources = [src_dir / "src/vision.cpp"] + sorted((src_dir / "src/cpu").glob("*.cpp")) + sorted(
        (src_dir / "src/cuda").glob("*.cu"))
    return load(name="upstream_msda", sources=[str(s) for s in sources], extra_include_paths=[str(src_dir / "src")],
                extra_cflags=["-DWITH_CUDA"],
                extra_cuda_cflags=["-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
                                   "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"],
                verbose=False)


def variants(ours, upstream, compiled_pytorch):
    """name -> (value dtype, fn(inputs) -> (forward callable, fwd+bwd callable))."""
    def ours_fn(width):
        def make(value, shapes, starts, loc, attn, grad_out):
            fwd = lambda: ours.forward(value, shapes, starts, loc, attn, width)  # noqa: E731
            both = lambda: (fwd(), ours.backward(value, shapes, starts, loc, attn, grad_out, width))  # noqa: E731
            return fwd, both
        return make

    def upstream_fn(value, shapes, starts, loc, attn, grad_out):
        fwd = lambda: upstream.ms_deform_attn_forward(value, shapes, starts, loc, attn, 64)  # noqa: E731
        both = lambda: (fwd(), upstream.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad_out, 64))  # noqa: E731
        return fwd, both

    def pytorch_fn(fn):
        def make(value, shapes, starts, loc, attn, grad_out):
            leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]

            def fwd():
                with torch.no_grad():
                    return fn(value, shapes, starts, loc, attn)

            def both():
                out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
                return torch.autograd.grad(out, leaves, grad_out)
            return fwd, both
        return make

    table = {"ours fp32": (torch.float32, ours_fn(0)), "ours bf16": (torch.bfloat16, ours_fn(0))}
    for width in (1, 2, 4):
        table[f"ours fp32 w{width}"] = (torch.float32, ours_fn(width))
    for width in (1, 2, 4, 8):
        table[f"ours bf16 w{width}"] = (torch.bfloat16, ours_fn(width))
    if upstream is not None:
        table["upstream fp32"] = (torch.float32, upstream_fn)
    table["pytorch fp32"] = (torch.float32, pytorch_fn(ms_deform_attn_pytorch))
    if compiled_pytorch is not None:
        table["pytorch compiled fp32"] = (torch.float32, pytorch_fn(compiled_pytorch))
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream-src", type=Path, help="directory with upstream's src/ (vision.cpp, cuda/, cpu/)")
    parser.add_argument("--out", type=Path, help="directory for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="only batch 2, skip torch.compile and width sweeps")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ms_deform_attn.py needs a CUDA GPU")
    reason = msda_op.kernel_status("cuda")
    if reason is not None:
        sys.exit(f"our kernel is unavailable: {reason}")
    ours = msda_op._extension
    upstream = None
    if args.upstream_src is not None:
        t0 = time.perf_counter()
        upstream = load_upstream(args.upstream_src)
        print(f"built upstream kernel in {time.perf_counter() - t0:.0f}s", flush=True)
    compiled = None if (args.quick or args.no_compile) else torch.compile(ms_deform_attn_pytorch)
    table = variants(ours, upstream, compiled)
    if args.quick:
        table = {k: v for k, v in table.items() if " w" not in k}

    device = torch.cuda.get_device_name()
    results = []
    for batch in ((2,) if args.quick else (2, 8)):
        for input_name, level_shapes in INPUTS.items():
            tokens = sum(h * w for h, w in level_shapes)
            for role, queries in (("encoder", tokens), ("decoder", 900)):
                inputs = {dtype: make_inputs(level_shapes, batch, queries, dtype)
                          for dtype in (torch.float32, torch.bfloat16)}
                # Sanity: every variant computes the same forward on the same data.
                reference = ms_deform_attn_pytorch(*inputs[torch.float32][:5]).float()
                for name, (dtype, make) in table.items():
                    fwd, both = make(*inputs[dtype])
                    try:
                        out = fwd()
                        err = ((out.float() - reference).norm() / reference.norm()).item()
                        fwd_ms, both_ms = time_ms(fwd), time_ms(both)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"{name}: out of memory at batch {batch} {input_name} {role}", flush=True)
                        continue
                    element = torch.tensor([], dtype=dtype).element_size()
                    fwd_bytes, both_bytes = bytes_moved(batch, tokens, queries, len(level_shapes), element)
                    row = dict(batch=batch, input=input_name, role=role, queries=queries, tokens=tokens,
                               variant=name, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, rel_err_vs_pytorch=err,
                               fwd_GBps=fwd_bytes / fwd_ms / 1e6, fwd_bwd_GBps=both_bytes / both_ms / 1e6)
                    results.append(row)
                    print(f"b{batch} {input_name:8s} {role:7s} {name:22s} fwd {fwd_ms:8.3f} ms  fwd+bwd "
                          f"{both_ms:8.3f} ms  {row['fwd_bwd_GBps']:7.0f} GB/s  err {err:.1e}", flush=True)
                del inputs
                torch.cuda.empty_cache()

    lines = [f"device: {device}; torch {torch.__version__}; median ms (CUDA events)", "",
             "| batch | input | role | Lq | variant | fwd ms | fwd+bwd ms | fwd+bwd GB/s | vs upstream | vs pytorch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        same = [r for r in results if (r["batch"], r["input"], r["role"]) == (row["batch"], row["input"], row["role"])]
        base = {r["variant"]: r["fwd_bwd_ms"] for r in same}
        vs_up = f"{base['upstream fp32'] / row['fwd_bwd_ms']:.2f}x" if "upstream fp32" in base else "-"
        vs_pt = f"{base['pytorch fp32'] / row['fwd_bwd_ms']:.1f}x" if "pytorch fp32" in base else "-"
        lines.append(f"| {row['batch']} | {row['input']} | {row['role']} | {row['queries']} | {row['variant']} | "
                     f"{row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | {row['fwd_bwd_GBps']:.0f} | {vs_up} | {vs_pt} |")
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_results.json").write_text(json.dumps(dict(device=device, results=results), indent=1))
        (args.out / "bench_results.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
