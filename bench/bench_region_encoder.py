#!/usr/bin/env python
"""Forward+backward time of the region encoder (``<bbox>`` features) at the 13b preset's shapes, per variant.

    python bench/bench_region_encoder.py --json out.json                  # one GPU
    python bench/bench_region_encoder.py --device cpu --preset tiny       # smoke run

Variants: ``eager`` (as trained), ``compiled_rounds`` (each fuse round's conv+GroupNorm+ReLU through
torch.compile), ``cudnn_benchmark`` (cuDNN times its algorithms for each shape). Inputs as a referring
micro-batch makes them: one CLIP image per row, a few boxes per row.
Every variant's output and gradients are compared with the eager ones (relative error), so a fast
variant that computes something else shows up.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from check_compiled_step import relative_errors  # noqa: E402
from results import machine_fields, record_variant, write_json  # noqa: E402
from chatterbox.model.presets import preset  # noqa: E402
from chatterbox.model.region_encoder import RegionEncoder  # noqa: E402

VARIANTS = ("eager", "compiled_rounds", "cudnn_benchmark")


def region_encoder_flops(cfg, images: int, boxes: int) -> float:
    """Forward matmul/conv FLOPs (2 per multiply-add): 1x1 input convs and 3x3 fuse rounds on every pyramid
    level, the 3x3 conv per level on each box's RoI, the RoI projection and the output projection."""
    rc = cfg.region_encoder
    c, pixels = rc.embed_dims, sum(size * size for size in rc.level_sizes)
    fuse = images * pixels * 2 * c * ((cfg.clip.hidden_size + 2) + rc.num_fuse_rounds * 9 * c)
    roi_pixels = rc.roi_output_size ** 2
    per_box = (rc.num_levels * roi_pixels * 2 * 9 * c * c + 2 * c * roi_pixels * rc.roi_feature_dims
               + 2 * rc.roi_feature_dims * cfg.language.hidden_size)
    return fuse + boxes * per_box


def make_inputs(cfg, images: int, boxes_per_image: int, device, dtype, generator):
    patches = (cfg.clip.image_size // cfg.clip.patch_size) ** 2
    levels = [torch.randn(images, patches, cfg.clip.hidden_size, generator=generator).to(device, dtype)
              for _ in range(cfg.region_encoder.num_levels)]
    corner = torch.rand(images * boxes_per_image, 2, generator=generator) * 0.6
    size = 0.05 + torch.rand(images * boxes_per_image, 2, generator=generator) * 0.35
    boxes = torch.cat([corner, corner + size], dim=1).to(device)
    index = torch.arange(images).repeat_interleave(boxes_per_image).to(device)
    return levels, boxes, index


def configure(encoder: RegionEncoder, variant: str) -> None:
    for module in encoder.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in variant
    if "compiled_rounds" in variant:
        for block in encoder.fuse.rounds:
            block.compile()


def step(encoder, levels, boxes, index, out_grad):
    encoder.zero_grad(set_to_none=True)
    inputs = [level.detach().requires_grad_() for level in levels]
    out = encoder(inputs, boxes, index)
    out.backward(out_grad)
    return out.detach().float(), {n: p.grad.float() for n, p in encoder.named_parameters()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="13b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=6, help="CLIP images per micro-batch (the micro-batch)")
    parser.add_argument("--boxes-per-image", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = preset(args.preset)
    torch.manual_seed(0)
    encoder = RegionEncoder(cfg.region_encoder, cfg.clip.hidden_size, cfg.clip.image_size,
                            cfg.language.hidden_size).to(device, dtype).train()
    generator = torch.Generator().manual_seed(0)
    levels, boxes, index = make_inputs(cfg, args.images, args.boxes_per_image, device, dtype, generator)
    out_grad = torch.randn(boxes.shape[0], cfg.language.hidden_size, generator=generator).to(device, dtype)
    flops = 3 * region_encoder_flops(cfg, images=args.images, boxes=boxes.shape[0])  # backward ~ 2x forward
    report = {**machine_fields(device), "images": args.images, "boxes": int(boxes.shape[0]),
              "fwd_bwd_tflop_approx": flops / 1e12, "variants": {}}
    reference = None
    for variant in args.variants.split(","):
        configure(encoder, variant)
        started = time.perf_counter()
        for _ in range(args.warmup):
            out, grads = step(encoder, levels, boxes, index, out_grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warmup_s = time.perf_counter() - started
        times = []
        for _ in range(args.reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            step(encoder, levels, boxes, index, out_grad)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - begin)
        median = statistics.median(times)
        entry = {"fwd_bwd_ms": 1e3 * median, "tflops": flops / median / 1e12, "warmup_s": warmup_s}
        if reference is None:
            reference = (out, grads)
        else:
            ref_out, ref_grads = reference
            entry["output_rel_err"] = relative_errors({"out": out}, {"out": ref_out})["all"]
            entry["grad_rel_err"] = relative_errors(grads, ref_grads)["all"]
        record_variant(report["variants"], variant, entry)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
