#!/usr/bin/env python
"""Profile one ChatterBox stage-2 training micro-step (torch.profiler): where the time goes.

    python bench/profile_train_step.py --out outputs/profile                  # 13b grounding, ours, one GPU
    python bench/profile_train_step.py --mode upstream --stream referring      # another configuration
    python bench/profile_train_step.py --tiny                                  # CPU smoke run, seconds

Model, batches and modes are those of bench/bench_train_step.py (random weights, real shapes,
micro-batch 6, one DeepSpeed ZeRO-2 engine; ``upstream`` = fp16, eager attention, every LLM layer and
the vision encoder checkpointed). The script reports, per micro-step:

1. ``vision_alone``: forward + backward of the vision branch on the LLM's (detached) hidden states with
   plain autograd, before the engine exists (query head, frozen Swin, input projections, encoder,
   decoder, heads, matcher, criterion): median wall time, then one profiled repetition;
2. ``step``: the whole training micro-step (engine forward, engine.backward, engine.step inside an
   accumulation cycle, so without the optimizer): median wall time, then ``--profile-steps`` profiled;
3. for both, per named stage (STAGES / MODULE_STAGES): CUDA kernel time, kernel count and CPU time;
   backward work is charged to the stage whose forward op made the autograd node (``bwd:`` prefix);
4. top ops by self CUDA time and by self CPU time;
5. host syncs: the CUDA synchronise / memcpy calls in the profile, and, from one more step under
   ``torch.cuda.set_sync_debug_mode("warn")``, every synchronising call site (file:line) with its count.

Writes profile.json and profile.md under --out (and a gzipped Chrome trace with --trace).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import functools
import gzip
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import bench_train_step as bench  # noqa: E402

# (label, attribute path from the ChatterBox model ("" = the model), method); nested ranges are fine:
# time is charged to the innermost one.
STAGES = (
    ("llm.inputs_embeds", "", "build_inputs_embeds"),
    ("clip", "clip_tower", "forward"),
    ("llm.decoder", "causal_lm.model", "forward"),
    ("llm.lm_loss", "", "_lm_loss"),
    ("vision", "", "_grounding_losses"),
    ("vision.query_head", "query_head", "forward"),
    ("vision.backbone", "vision_branch", "forward_backbone"),
    ("vision.enc_dec", "vision_branch", "forward_enc_dec"),
    ("vision.input_proj", "vision_branch", "project_features"),
    ("vision.transformer", "vision_branch.transformer", "forward"),
    ("vision.encoder", "vision_branch.transformer.encoder", "forward"),
    ("vision.decoder", "vision_branch.transformer.decoder", "forward"),
    ("vision.criterion", "grounding_criterion", "forward"),
    ("vision.matcher", "grounding_criterion.matcher", "forward"),
)
# Every module of these classes gets a range (by class name, so older code versions profile too).
MODULE_STAGES = {
    "BiAttentionBlock": "vision.encoder.fusion",
    "TextEnhancerLayer": "vision.encoder.text_enhancer",
    "DeformableEncoderLayer": "vision.encoder.deformable_layer",
    "DeformableDecoderLayer": "vision.decoder.layer",
    "MultiScaleDeformableAttention": "vision.ms_deform_attn",
}
ENGINE_STAGES = (("step.forward", "forward"), ("step.backward", "backward"), ("step.optimizer", "step"))
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
MEMCPY_CALLS = ("cudaMemcpyAsync", "cudaMemcpy")
BACKWARD_SCOPE = 1  # torch.autograd.profiler RecordScope.BACKWARD_FUNCTION


# ----------------------------------------------------------------------------------------------------
# ranges
def _resolve(root, path: str):
    obj = root
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _wrap(obj, method: str, label: str) -> bool:
    """Put ``obj.method`` inside a profiler range named ``label``; False if there is no such method."""
    original = getattr(obj, method, None)
    if original is None:
        return False
    if getattr(original, "_profile_label", None) == label:
        return True  # installed before

    @functools.wraps(original)
    def ranged(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    ranged._profile_label = label
    setattr(obj, method, ranged)  # the instance attribute shadows the class's method
    return True


def _compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def install_ranges(model, engine=None) -> list[str]:
    """Named profiler ranges around the model's stages (and the engine's calls); returns the labels.

    Blocks compiled with ``nn.Module.compile``, and modules inside them, get no range: a wrapped
    ``forward`` would be traced by dynamo and recompile the block (the ranges inside a compiled graph are
    dropped anyway), so their work is charged to the enclosing stage (e.g. ``vision.encoder``)."""
    labels = []
    for label, path, method in STAGES:
        obj = _resolve(model, path)
        if obj is not None and _wrap(obj, method, label):
            labels.append(label)
    inside_compiled = {id(m) for block in model.modules() if _compiled(block) for m in block.modules()}
    for module in model.modules():
        label = MODULE_STAGES.get(type(module).__name__)
        if label and id(module) not in inside_compiled and _wrap(module, "forward", label):
            labels.append(label)
    if engine is not None:
        for label, method in ENGINE_STAGES:
            if _wrap(engine, method, label):
                labels.append(label)
    return sorted(set(labels))


# ----------------------------------------------------------------------------------------------------
# profile analysis
def _sort_key(prof, kind: str) -> str:
    """key_averages sort key across torch versions (device_* since 2.4, cuda_* before)."""
    sample = prof.key_averages()
    names = [f"self_device_time_total", "self_cuda_time_total"] if kind == "device" else ["self_cpu_time_total"]
    for name in names:
        if not sample or hasattr(sample[0], name):
            return name
    return names[-1]


def top_ops(prof, kind: str, steps: int, top: int, labels: set[str] = frozenset()) -> list[dict]:
    """The ``top`` ops by self device (``kind="device"``) or CPU time; our named ranges are left out
    (their "self CUDA" is the span of the range on the GPU, not work of their own)."""
    key = _sort_key(prof, kind)
    rows = []
    averages = [a for a in prof.key_averages() if a.key not in labels]
    for avg in sorted(averages, key=lambda a: getattr(a, key, 0.0), reverse=True)[:top]:
        device_us = getattr(avg, "self_device_time_total", getattr(avg, "self_cuda_time_total", 0.0))
        rows.append({"name": avg.key, "calls_per_step": avg.count / steps,
                     "self_cuda_ms_per_step": device_us / 1e3 / steps,
                     "self_cpu_ms_per_step": avg.self_cpu_time_total / 1e3 / steps})
    return rows


def attribute_stages(events, labels: set[str], steps: int) -> dict[str, dict]:
    """CUDA kernel time, kernel count and CPU time per stage per step. A CPU op's kernels go to its
    innermost labelled range; a backward node's work goes to ``bwd:`` + the stage of its forward op
    (matched by sequence number and forward thread, as torch.profiler links them)."""
    cpu_events = [e for e in events if getattr(e.device_type, "name", str(e.device_type)) == "CPU"]
    roots = [e for e in cpu_events if e.cpu_parent is None]
    forward_stage: dict[tuple, str] = {}

    def is_backward(e) -> bool:
        return getattr(e, "scope", 0) == BACKWARD_SCOPE or e.name.startswith("autograd::engine::evaluate_function")

    def collect(e, stage):  # pass 1: which stage each forward autograd op ran in
        if is_backward(e):
            return
        stage = e.name if e.name in labels else stage
        if e.sequence_nr >= 0 and stage:
            forward_stage[(e.sequence_nr, e.thread)] = stage
        for child in e.cpu_children:
            collect(child, stage)

    totals: dict[str, dict] = collections.defaultdict(lambda: {"cuda_ms": 0.0, "kernels": 0, "cpu_ms": 0.0})

    def charge(e, stage, backward):  # pass 2
        if is_backward(e) and not backward:
            backward = True
            stage = "bwd:" + forward_stage.get((e.sequence_nr, e.fwd_thread), "(other)")
        if e.name in labels:
            stage = ("bwd:" if backward else "") + e.name  # inside backward: a checkpoint's recompute
        row = totals[stage or "(other)"]
        row["cuda_ms"] += sum(k.duration for k in e.kernels) / 1e3
        row["kernels"] += len(e.kernels)
        row["cpu_ms"] += e.self_cpu_time_total / 1e3
        for child in e.cpu_children:
            charge(child, stage, backward)

    for root in roots:
        collect(root, None)
    for root in roots:
        charge(root, None, False)
    return {stage: {k: v / steps for k, v in row.items()}
            for stage, row in sorted(totals.items(), key=lambda kv: (-kv[1]["cuda_ms"], -kv[1]["cpu_ms"]))}


def runtime_calls(events, steps: int) -> dict[str, float]:
    """CUDA runtime calls that stall the host (synchronise) or copy memory, per step."""
    counts = collections.Counter(e.name for e in events if e.name in SYNC_CALLS + MEMCPY_CALLS)
    device_copies = collections.Counter(e.name for e in events if e.name.startswith("Memcpy"))
    return {**{k: v / steps for k, v in counts.items()}, **{f"device {k}": v / steps for k, v in device_copies.items()}}


def summarise(prof, labels: set[str], steps: int, top: int) -> dict:
    result: dict = {"top_cuda": [], "top_cpu": [], "runtime_calls_per_step": {}}
    try:
        events = prof.events()
        result.update(top_cuda=top_ops(prof, "device", steps, top, labels),
                      top_cpu=top_ops(prof, "cpu", steps, top, labels),
                      runtime_calls_per_step=runtime_calls(events, steps))
    except Exception:  # noqa: BLE001 - keep the timings even if the profile cannot be read
        result["profile_error"] = traceback.format_exc()
        return result
    kernels = [e for e in events if getattr(e.device_type, "name", "") == "CUDA"]
    if kernels:
        result["gpu_busy_ms_per_step"] = _union_ms(kernels) / steps
        result["gpu_events_per_step"] = len(kernels) / steps
    try:
        stages = attribute_stages(events, labels, steps)
        result["stages"] = stages
        total_cuda = sum(r["cuda_ms"] for r in stages.values())
        vision = sum(r["cuda_ms"] for s, r in stages.items() if s.removeprefix("bwd:").startswith("vision"))
        result["kernel_ms_per_step"] = total_cuda
        result["vision_kernel_ms_per_step"] = vision
        result["vision_kernel_share"] = vision / total_cuda if total_cuda else None
    except Exception:  # noqa: BLE001 - the tables above are still worth writing
        result["stages_error"] = traceback.format_exc()
    return result


def _union_ms(device_events) -> float:
    """Time the GPU was busy (union of kernel/memcpy intervals), ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in device_events)
    busy, end = 0.0, None
    start = None
    for s, e in spans:
        if end is None or s > end:
            if end is not None:
                busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        busy += end - start
    return busy / 1e3


def sync_sites(run_step, device: torch.device) -> dict:
    """One more step with CUDA sync debugging on: every synchronising Python call site and its count."""
    if device.type != "cuda":
        return {"note": "CPU run: no host<->device synchronisation"}
    sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize(device)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            where = os.path.relpath(w.filename, REPO) if w.filename.startswith(str(REPO)) else w.filename
            sites[f"{where}:{w.lineno}"] += 1
    return {"total": sum(sites.values()), "sites": dict(sites.most_common())}


# ----------------------------------------------------------------------------------------------------
# driver
def profile_block(device, run, steps: int, trace_path: Path | None):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # One warm-up step inside the profiler absorbs its start-up cost (CUPTI buffers) so that it does
    # not land in the recorded step.
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        for _ in range(steps + 1):
            run()
            bench.synchronize(device)
            prof.step()
    if trace_path is not None:
        raw = trace_path.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace_path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return prof


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def timed(device, run, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        bench.synchronize(device)
        t0 = time.perf_counter()
        run()
        bench.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def run(args) -> dict:
    from chatterbox.config import StreamConfig, TrainConfig
    from chatterbox.model.chatterbox import causal_mask_suffices
    from bench.flops import llm_matmul_params
    from chatterbox.train.distributed import init_distributed
    from chatterbox.train.engine import build_engine, use_stream
    from chatterbox.train.loop import PRECISION_DTYPES

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist = init_distributed(args.device)
    device = dist.device
    on_gpu = device.type == "cuda"
    upstream_like = args.mode.startswith("upstream")
    precision = ("fp16" if upstream_like else "bf16") if on_gpu else "bf16"
    dtype = PRECISION_DTYPES[precision]
    result = {"mode": args.mode, "preset": args.preset, "stream": args.stream, "precision": precision,
              "micro_batch": args.micro_batch, "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
              "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "code": str(REPO)}
    model, cfg = bench.build_model(args, "upstream" if upstream_like else args.mode, device, dtype)
    model.train()
    if on_gpu:
        from model.GroundingDINO.ms_deform_attn import kernel_status

        result["msda_kernel"] = kernel_status(device) or "cuda kernel"
    num_layers = llm_matmul_params(model.causal_lm).num_layers
    model.set_gradient_checkpointing(num_layers if upstream_like else args.checkpoint_layers)
    generator = torch.Generator().manual_seed(args.seed)
    batches = bench.stream_batches(model, cfg, args.stream, args.micro_batch, args.distinct_batches, generator,
                                   device, dtype)
    result["queries_per_batch"] = [sum(len(t) for t in b["grounding_targets_cxcywh_norm"]) for b in batches]
    result["target_boxes_per_batch"] = [sum(len(x) for t in b["grounding_targets_cxcywh_norm"] for x in t)
                                        for b in batches]

    # 1. The vision branch alone (plain autograd, before the engine hooks the parameters).
    if args.stream == "grounding":
        hidden_inputs = []
        with torch.no_grad():
            for b in batches:
                embeds = model.build_inputs_embeds(b["input_ids"], b["images_clip"], b["offset"],
                                                   b["region_boxes_xyxy_clip_norm"], b["sample_ids"])
                hidden = model.causal_lm.model(inputs_embeds=embeds, attention_mask=causal_mask_suffices(
                    b["attention_mask"]), use_cache=False).last_hidden_state
                hidden_inputs.append(hidden.detach())
        counter = iter(range(10**9))
        host_ids = [b["input_ids"].cpu() for b in batches]

        def vision_step():
            i = next(counter) % len(batches)
            b, hidden = batches[i], hidden_inputs[i].requires_grad_(True)
            losses = model._grounding_losses(hidden, b["input_ids"], host_ids[i], b["images_dino"], b["offset"],
                                             b["grounding_targets_cxcywh_norm"], b["sample_ids"])
            losses["loss"].backward()
            hidden.grad = None

        timed(device, vision_step, args.warmup)
        times = timed(device, vision_step, args.timed)
        graphs_before = compiled_graphs()
        labels = set(install_ranges(model))
        prof = profile_block(device, vision_step, 1, None)
        result["vision_alone"] = {"median_s": statistics.median(times), "times_s": times,
                                  **summarise(prof, labels, 1, args.top),
                                  "graphs_compiled_while_profiling": compiled_graphs() - graphs_before}
        model.zero_grad(set_to_none=True)
        del hidden_inputs
        print(f"[profile] vision branch alone: median {result['vision_alone']['median_s']:.4f} s", flush=True)

    # 2. The training micro-step through the engine (accumulation never ends inside the measured steps).
    stream_cfg = StreamConfig(micro_batch_size=args.micro_batch, gradient_accumulation_steps=10**6, every_n_steps=1)
    train = TrainConfig(stage=2, precision=precision, streams={args.stream: stream_cfg})
    engine = build_engine(model, train, dist.world_size)[0]
    use_stream(engine, stream_cfg, dist.world_size)
    counter = iter(range(10**9))

    def train_step():
        batch = batches[next(counter) % len(batches)]
        out_ = engine(**batch)
        engine.backward(out_["loss"])
        engine.step()

    timed(device, train_step, args.warmup)
    times = timed(device, train_step, args.timed)
    result["step"] = {"median_s": statistics.median(times), "times_s": times}
    print(f"[profile] training micro-step: median {result['step']['median_s']:.4f} s", flush=True)
    graphs_before = compiled_graphs()
    labels = set(install_ranges(model, engine))
    trace = out / f"trace_{args.mode}_{args.stream}.json.gz" if args.trace else None
    prof = profile_block(device, train_step, args.profile_steps, trace)
    result["step"].update(summarise(prof, labels, args.profile_steps, args.top))
    # Should be 0: a recompile inside the profiled steps would make them unrepresentative.
    result["step"]["graphs_compiled_while_profiling"] = compiled_graphs() - graphs_before
    result["step"]["sync_sites"] = sync_sites(train_step, device)
    if "vision_alone" in result:
        result["vision_alone_share_of_step"] = result["vision_alone"]["median_s"] / result["step"]["median_s"]
    if on_gpu:
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


# ----------------------------------------------------------------------------------------------------
# report
def _stage_table(stages: dict, top: int = 40) -> list[str]:
    lines = ["| stage | CUDA ms | kernels | CPU ms |", "|---|---|---|---|"]
    for name, row in list(stages.items())[:top]:
        lines.append(f"| {name} | {row['cuda_ms']:.2f} | {row['kernels']:.0f} | {row['cpu_ms']:.2f} |")
    return lines


def _ops_table(rows: list[dict]) -> list[str]:
    lines = ["| op | calls | self CUDA ms | self CPU ms |", "|---|---|---|---|"]
    for r in rows:
        name = r["name"].replace("|", "/")[:90]
        lines.append(f"| {name} | {r['calls_per_step']:.0f} | {r['self_cuda_ms_per_step']:.2f} | "
                     f"{r['self_cpu_ms_per_step']:.2f} |")
    return lines


def format_report(result: dict) -> str:
    lines = [f"# Profile: {result['preset']} {result['stream']} micro-step, mode {result['mode']} "
             f"({result['precision']}, micro-batch {result['micro_batch']})", "",
             f"{result['device_name']}, torch {result['torch']}, {result['date']}; code {result['code']}; "
             f"deformable attention: {result.get('msda_kernel', '-')}; queries per batch "
             f"{result.get('queries_per_batch')}", ""]
    if "vision_alone_share_of_step" in result:
        share = result["vision_alone_share_of_step"]
        lines += [f"Vision branch alone / whole micro-step (wall): {100 * share:.0f}%", ""]
    for part in ("vision_alone", "step"):
        res = result.get(part)
        if not res:
            continue
        title = "Vision branch alone (forward + backward, plain autograd)" if part == "vision_alone" \
            else "Training micro-step (engine forward + backward + step, no optimizer)"
        lines += [f"## {title}", "", f"median wall {1e3 * res['median_s']:.1f} ms over {len(res['times_s'])} "
                  f"repetitions; GPU busy {res.get('gpu_busy_ms_per_step', float('nan')):.1f} ms; kernel time "
                  f"{res.get('kernel_ms_per_step', float('nan')):.1f} ms, of it vision branch "
                  f"{res.get('vision_kernel_ms_per_step', float('nan')):.1f} ms; GPU events "
                  f"{res.get('gpu_events_per_step', 0):.0f} per step; graphs compiled while profiling "
                  f"{res.get('graphs_compiled_while_profiling', 0)}", ""]
        calls = res.get("runtime_calls_per_step", {})
        lines += ["Host-side CUDA calls per step: " + (", ".join(f"{k} {v:.0f}" for k, v in sorted(calls.items()))
                                                        or "none"), ""]
        if "sync_sites" in res:
            sites = res["sync_sites"]
            lines += [f"Synchronising call sites (sync debug mode, one step): {sites.get('total', sites.get('note'))}",
                      ""]
            for site, count in list(sites.get("sites", {}).items())[:25]:
                lines.append(f"* {site}: {count}")
            lines.append("")
        if "stages" in res:
            lines += ["### Per stage (per step; bwd: = backward of that stage)", ""]
            lines += _stage_table(res["stages"]) + [""]
        elif "stages_error" in res:
            lines += ["stage attribution failed:", "```", res["stages_error"], "```", ""]
        lines += ["### Top ops by self CUDA time", ""] + _ops_table(res["top_cuda"]) + [""]
        lines += ["### Top ops by self CPU time", ""] + _ops_table(res["top_cpu"]) + [""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ours", "ours-eager-grounding", "ours-uncompiled", "ours-eager-encoders",
                                           "upstream"),
                        default="ours", help="as in bench_train_step.py; upstream = its upstream-1engine. "
                        "Compiled blocks get no per-module range (their time goes to the enclosing stage)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled blocks (aot_eager needs no compiler)")
    parser.add_argument("--preset", default="13b")
    parser.add_argument("--stream", choices=bench.STREAMS, default="grounding")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--micro-batch", type=int, default=6)
    parser.add_argument("--checkpoint-layers", type=int, default=0, help="ours: LLM layers to checkpoint")
    parser.add_argument("--distinct-batches", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed", type=int, default=6, help="timed repetitions (median reported)")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", action="store_true", help="also write a gzipped Chrome trace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/profile")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny preset, few steps")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.device, args.micro_batch = "tiny", "cpu", 2
        args.distinct_batches, args.warmup, args.timed, args.profile_steps = 1, 1, 1, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = run(args)
    out = Path(args.out)
    name = f"profile_{args.mode}_{args.stream}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    report = format_report(result)
    (out / f"{name}.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
