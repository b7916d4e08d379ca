#!/usr/bin/env python
"""Does compiling change a training micro-step? Losses and gradients of one forward+backward, eager vs
compiled blocks (as ``chatterbox.accel.compile_layers``, or one kind of vision block), on the benchmark's model
and batches.

    python bench/check_compiled_step.py --stream grounding --json out.json     # 13b preset, one GPU
    python bench/check_compiled_step.py --preset tiny --device cpu             # CPU smoke run

Per variant: every loss term, the parameters whose gradient is not finite (the first few by name), and
the relative gradient difference from the eager step per parameter group (LLM, vision, ...).
Plain autograd, no engine: it isolates the model's numerics from the optimizer.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_train_step as bench  # noqa: E402
from results import record_variant, write_json  # noqa: E402

from chatterbox.accel import compilable_blocks, use_grounding_loss_graphs  # noqa: E402


def blocks(model, variant: str) -> list:
    """The blocks a variant compiles: ``language``/``vision``/``all`` as chatterbox.accel.compile_layers, or one
    kind of vision block (``fusion``, ``text``, ``encoder``, ``decoder``) to find which one changes a step."""
    encoder, decoder = model.vision_branch.transformer.encoder, model.vision_branch.transformer.decoder
    kinds = {"fusion": encoder.fusion_layers, "text": encoder.text_layers, "encoder": encoder.layers,
             "decoder": decoder.layers, "region_encoder": [model.region_encoder]}
    if variant in kinds:
        return list(kinds[variant])
    return compilable_blocks(model, language=variant in ("language", "all"), vision=variant in ("vision", "all"))


def group_of(name: str) -> str:
    for prefix in ("language_model", "vision_branch", "region_encoder", "query_head"):
        if name.startswith(prefix):
            return prefix
    return "other"


def relative_errors(values: dict, reference: dict, group=lambda name: "all") -> dict[str, float]:
    """|x - x_ref| / |x_ref| over all tensors of a group together (``group(name)``; default one group): a
    single tensor's relative error is meaningless where its true value is ~0, e.g. a bias before a norm."""
    sums: dict[str, list[float]] = {}
    for name, value in values.items():
        total = sums.setdefault(group(name), [0.0, 0.0])
        total[0] += (value - reference[name]).square().sum().item()
        total[1] += reference[name].square().sum().item()
    return {key: (diff / max(ref, 1e-30)) ** 0.5 for key, (diff, ref) in sums.items()}


def one_step(model, batch) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    losses = {k: float(v.detach()) for k, v in out.items() if v.dim() == 0}
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="13b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stream", choices=bench.STREAMS, default="grounding")
    parser.add_argument("--micro-batch", type=int, default=6)
    parser.add_argument("--variants", default="eager,language,vision,all",
                        help="eager, language, vision, all, or one block kind: fusion, text, encoder, decoder, "
                             "region_encoder")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="fp32 separates real differences from bf16 rounding (which can flip matches)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager needs no compiler)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, cfg = bench.build_model(args, "ours-uncompiled", device, dtype)
    use_grounding_loss_graphs(model, False)  # the variants differ only in what is compiled
    model.train()
    for module in model.modules():  # no dropout or drop-path: the variants must compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    model.set_gradient_checkpointing(0)
    batch = bench.stream_batches(model, cfg, args.stream, args.micro_batch, 1,
                                 torch.Generator().manual_seed(args.seed), device, dtype)[0]
    report, reference = {}, None
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        for module in model.modules():  # undo the previous variant's nn.Module.compile
            module._compiled_call_impl = None
        for block in blocks(model, variant):
            block.compile(backend=args.backend)
        started = time.perf_counter()
        one_step(model, batch)  # compiles
        first_s = time.perf_counter() - started
        losses, grads = one_step(model, batch)
        non_finite = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        entry = {"losses": losses, "first_step_s": first_s, "non_finite_grads": len(non_finite),
                 "non_finite_names": non_finite[:12]}
        if reference is None:
            reference = grads
        else:
            entry["relative_grad_error"] = relative_errors(grads, reference, group_of)
        record_variant(report, variant, entry)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
