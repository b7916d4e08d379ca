"""What upstream's three DeepSpeed engines cost: which engines' ZeRO-2 gradient hooks fire, and step time.

Upstream's stage 2 calls `deepspeed.initialize` three times on the same model (referring, VQA, grounding)
and trains through the last engine only (spec/upstream.md §2.4, §5 item 6). Whether the first two
engines' gradient hooks still fire on that engine's backward decides whether the set-up costs step time
or only memory, and that depends on the DeepSpeed version: a hook on the parameter's AccumulateGrad node
(DeepSpeed 0.11.1, upstream's) is orphaned when a later engine moves the parameter's data to the host
and back; a post-accumulate-grad hook on the parameter (newer DeepSpeed on torch >= 2.1) is not.

This builds a model with as many trainable fp16 parameters as ChatterBox-13b trains (704.9M, so the
gradient bucket of 5e8 elements fills during backward as in upstream), N engines with upstream's ZeRO-2
config, runs accumulation cycles through the last engine and reports, per engine, the gradient-hook calls
per backward and the engine's GPU memory; the median micro-step time; any error (as in a run).
    python bench/check_three_engines.py --engines 3 --json three.json     # one CUDA GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TRAINABLE_13B = 704_905_992  # ChatterBox-13b's trainable parameters (docs/BENCHMARKS.md)


PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_model(width: int, parameters: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    layers = max(1, round(parameters / (width * width + width)))
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        torch.nn.init.kaiming_normal_(blocks[-2].weight, nonlinearity="relu")  # activations keep their scale
        torch.nn.init.zeros_(blocks[-2].bias)
    with torch.device(device):
        return torch.nn.Sequential(*blocks).to(device=device, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    import deepspeed

    from chatterbox.config import StreamConfig, TrainConfig
    from chatterbox.train.distributed import init_distributed
    from chatterbox.train.engine import deepspeed_config

    dist = init_distributed(args.device)
    on_gpu = dist.device.type == "cuda"
    dtype = PRECISIONS[args.precision]
    torch.manual_seed(0)
    model = build_model(args.width, args.parameters, dist.device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = StreamConfig(micro_batch_size=args.micro_batch, gradient_accumulation_steps=args.gas, every_n_steps=1)
    train = TrainConfig(stage=2, precision=args.precision, streams={"grounding": stream})
    result = {"deepspeed": deepspeed.__version__, "torch": torch.__version__, "engines": args.engines,
              "trainable_parameters": sum(p.numel() for p in params), "precision": args.precision,
              "device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "hook_calls_per_backward": [], "engine_memory_gb": [], "error": None}
    engines = []
    for _ in range(args.engines):  # upstream: one engine per stream around the same model
        before = torch.cuda.memory_allocated() if on_gpu else 0
        optimizer = torch.optim.AdamW(params, lr=3e-5, betas=(0.9, 0.95), weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=deepspeed_config(train, stream, dist.world_size))
        if on_gpu:
            result["engine_memory_gb"].append((torch.cuda.memory_allocated() - before) / 2**30)
        engines.append(engine)
    calls = [0] * len(engines)
    for k, engine in enumerate(engines):  # count each engine's ZeRO-2 gradient-hook calls
        original = engine.optimizer.reduce_ready_partitions_and_remove_grads

        def counted(param, i, k=k, original=original):
            calls[k] += 1
            return original(param, i)

        engine.optimizer.reduce_ready_partitions_and_remove_grads = counted
    engine = engines[-1]
    first = [p.detach().float().clone() for p in list(model.parameters())[:2]]
    times = []
    x = torch.randn(args.micro_batch * args.tokens, args.width, device=dist.device, dtype=dtype)
    try:
        for micro in range(args.gas * (1 + args.cycles)):
            calls[:] = [0] * len(engines)
            synchronize(dist.device)
            t0 = time.perf_counter()
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
            synchronize(dist.device)
            if micro >= args.gas:  # the first cycle warms up (and allocates the optimizer state)
                times.append(time.perf_counter() - t0)
            result["hook_calls_per_backward"].append(list(calls))
    except Exception as failure:  # noqa: BLE001 - the error is the finding
        result["error"] = f"{type(failure).__name__}: {str(failure).split(chr(10))[0]}"
        traceback.print_exc()
    result["micro_step_s"] = statistics.median(times) if times else None
    result["weights_changed"] = any(not torch.equal(a, p.detach().float())
                                    for a, p in zip(first, list(model.parameters())[:2]))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp16", help="upstream's: fp16")
    parser.add_argument("--parameters", type=int, default=TRAINABLE_13B, help="trainable parameters to build")
    parser.add_argument("--width", type=int, default=5120)
    parser.add_argument("--micro-batch", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=320, help="rows per sample fed to the stack")
    parser.add_argument("--gas", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
