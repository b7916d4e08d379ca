"""Chat latency benchmark: time to first token, decode tokens/s and time to boxes for rounds 1..N of
one dialogue, against the memory-bandwidth bound of decoding (issue 8, item 5).

    python bench/bench_chat.py --preset 13b --out outputs/bench_chat_13b.json        # on an H100/H200
    python bench/bench_chat.py --preset tiny --device cpu --rounds 3 --answer-tokens 8   # smoke test

Random weights in bf16 (the timing of a forward pass does not depend on the values). Every round asks
about a region (`<bbox>`) and for a box (`[VG]`), and every answer is forced to the same length
(``min_new_tokens = max_new_tokens``) so rounds are comparable. Sessions use the static KV cache whose
decode steps are CUDA graphs (captured when the session is created, outside the timed rounds). Each
dialogue runs with the session's KV cache reused across rounds, with the fused step (the default) and
with transformers' step (the previous default), and, as a baseline, re-encoding the whole dialogue
every round; with ``--merge-lora`` also with LoRA folded into the weights. ``--compare-uncompiled``
adds the fused step without torch.compile, ``--compile-step`` transformers' step compiled,
``--compare-dynamic`` the eager growing-``DynamicCache`` decoder.

``--profile`` adds a kernel-time breakdown of one decode step of each step kind (torch.profiler over
CUDA-graph replays at ``--profile-context`` cached columns): time per step by kernel class (GEMV/GEMM,
attention, inductor-fused, cache writes, other), the bandwidth the matmul kernels reach over the
weights, and the idle time between kernels; also for the fused step with its matmuls as Triton
reductions tuned by inductor (``DecodeOptions(compile_options={"coordinate_descent_tuning": True})``,
gpt-fast's recipe).

Bound: one decode step reads every weight of the LLM once (embedding rows aside), so
``tokens/s <= bandwidth / weight_bytes``. The card's nominal bandwidth comes from --bandwidth-gbs or
the device name; the bandwidth a large device-to-device copy reaches is measured and reported too.
Results go to --out as JSON; summarise them in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Nominal HBM bandwidth (GB/s, 1e9 bytes) by device-name fragment, most specific first.
NOMINAL_BANDWIDTH_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
                         ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0))
QUESTIONS = ("What is <bbox>? [VG]", "What is the object in <bbox> made of? [VG]", "Is <bbox> near it? [VG]",
             "Describe <bbox> in detail. [VG]", "What colour is <bbox>? [VG]", "Where else is <bbox>? [VG]",
             "What is next to <bbox>? [VG]", "Which one is bigger, <bbox>? [VG]")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="13b", choices=("tiny", "7b", "13b"))
    parser.add_argument("--tokenizer", default="",
                        help="LLaMA-2 tokenizer folder (gives the real 32000-row vocabulary); default: the tiny "
                             "tokenizer, whose 1005-row vocabulary makes lm_head ~2%% of the weights smaller")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=64, help="tokens generated per round (forced)")
    parser.add_argument("--repeats", type=int, default=3, help="dialogues per variant; per-round medians reported")
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="card bandwidth (default: by name)")
    parser.add_argument("--merge-lora", action="store_true", help="also measure with LoRA merged into the weights")
    parser.add_argument("--no-baseline", action="store_true", help="skip the re-encode-every-round baseline")
    parser.add_argument("--compare-dynamic", action="store_true",
                        help="also measure the eager DynamicCache decoder (cache reused across rounds)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="static cache, but decode steps run eagerly")
    parser.add_argument("--compile-step", action="store_true",
                        help="also measure transformers' step compiled by torch.compile (then CUDA-graphed)")
    parser.add_argument("--compare-uncompiled", action="store_true",
                        help="also measure the fused step without torch.compile")
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown of one step of each kind")
    parser.add_argument("--profile-context", type=int, default=700,
                        help="cached columns when profiling (700 ~ the middle of the 8-round dialogue)")
    parser.add_argument("--out", default="outputs/bench_chat.json")
    return parser.parse_args(argv)


def build_model(args, device: torch.device, dtype: torch.dtype):
    from chatterbox.model.chatterbox import ChatterBox
    from chatterbox.model.presets import preset
    from chatterbox.model.weights import build_tokenizer

    cfg = preset(args.preset)
    cfg.language.gradient_checkpointing = False
    cfg.language.lora_dropout = 0.0
    if args.tokenizer:
        cfg.language.tokenizer_path = args.tokenizer
    tokenizer = build_tokenizer(cfg)
    if not args.tokenizer:
        cfg.language.vocab_size = min(cfg.language.vocab_size, len(tokenizer) - 5)
    torch.manual_seed(0)
    # Built directly on the device (random init there is fast), then cast.
    with torch.device(device):
        model = ChatterBox.build(cfg, tokenizer=tokenizer, verbose=False)
    return model.to(device=device, dtype=dtype).eval(), cfg


def decode_weight_bytes(model) -> int:
    """Bytes one decode step reads: the LLM's parameters except the embedding table and mm_projector."""
    lm = model.causal_lm
    skip = {id(p) for p in lm.get_input_embeddings().parameters()}
    skip |= {id(p) for p in lm.model.mm_projector.parameters()}
    return sum(p.numel() * p.element_size() for p in model.language_model.parameters() if id(p) not in skip)


def nominal_bandwidth(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e9, "--bandwidth-gbs"
    if device.type != "cuda":
        return None, "unknown (not a CUDA device)"
    name = torch.cuda.get_device_name(device)
    for fragment, gbs in NOMINAL_BANDWIDTH_GBS:
        if fragment in name:
            return gbs * 1e9, f"nominal for {fragment}"
    return None, f"unknown for {name!r}: pass --bandwidth-gbs"


def measured_copy_bandwidth(device: torch.device, gib: float = 2.0) -> float | None:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return None
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 * reps / elapsed


#: Inductor options that write the one-row matmuls as tuned Triton reductions (gpt-fast's recipe).
TRITON_GEMV = {"coordinate_descent_tuning": True}

#: Decode options (chatterbox.model.decoding.DecodeOptions) of each step kind measured.
FUSED = {"fused_step": True}
TRANSFORMERS = {"fused_step": False}


class DynamicCacheDecoder:
    """transformers' growing ``DynamicCache`` with one eager step per token, for one row without padding:
    the decoding of transformers' default ``generate`` (the baseline of the static cache)."""

    def __init__(self, causal_lm, device: torch.device):
        from transformers import DynamicCache

        self.inner, self.embed = causal_lm.model, causal_lm.get_input_embeddings()
        self.cache = DynamicCache(config=causal_lm.config)
        self.device, self.length, self.capacity = device, 0, float("inf")
        self.uses_cuda_graph, self.attention_buckets, self.capture_s = False, (), 0.0

    def _run(self, embeds: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.length, self.length + embeds.shape[1], device=self.device)[None]
        self.length += embeds.shape[1]
        return self.inner(inputs_embeds=embeds, position_ids=positions, past_key_values=self.cache,
                          use_cache=True).last_hidden_state

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, padding_mask=None) -> torch.Tensor:
        return self._run(embeds)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(self.embed(tokens[:, None]))[:, -1]

    @torch.no_grad()
    def truncate(self, length: int) -> None:
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)  # a negative count removes that many positions
        self.length = length

    def reset(self) -> None:
        self.truncate(0)

    def capture(self) -> bool:
        return False


def reencoding_session_class():
    """A ChatSession that encodes the whole dialogue again every round, as upstream's demo does (the
    baseline of cache reuse; same tokens and boxes)."""
    from chatterbox.serve.session import ChatSession

    class ReencodingChatSession(ChatSession):
        def _decoder_for(self, columns: int):
            decoder = super()._decoder_for(columns)
            decoder.reset()  # nothing cached: ask() encodes the whole dialogue
            return decoder

    return ReencodingChatSession


def dynamic_cache_session_class():
    """A ChatSession decoding with transformers' DynamicCache (DynamicCacheDecoder)."""
    from chatterbox.serve.session import ChatSession

    class DynamicCacheChatSession(ChatSession):
        def _decoder_for(self, columns: int):
            if self._decoder is None:
                self._decoder = DynamicCacheDecoder(self.model.causal_lm, self.device)
            return self._decoder

    return DynamicCacheChatSession


def run_dialogue(model, image, args, reuse_cache: bool, dynamic_cache: bool = False, **decode_options) -> list[dict]:
    from chatterbox.model.decoding import DecodeOptions
    from chatterbox.serve.session import ChatSession

    model.decode_options = DecodeOptions(cuda_graph=False if args.no_cuda_graph else None, **decode_options)
    session = (dynamic_cache_session_class() if dynamic_cache else ChatSession) if reuse_cache \
        else reencoding_session_class()
    chat = session(model, image, max_new_tokens=args.answer_tokens, max_image_pixels=None)
    decoder = chat._decoder_for(chat.max_context)
    step_kind = getattr(decoder, "step_kind", decoder)
    decoder_info = {"decoder": type(step_kind).__name__, "cuda_graph": bool(decoder.uses_cuda_graph),
                    "compiled_step": bool(getattr(step_kind, "compiled", False)),
                    "attention_buckets": len(decoder.attention_buckets), "graph_capture_s": decoder.capture_s}
    width, height = image.size
    rows = []
    for r in range(args.rounds):
        # A different region every round, inside the image.
        fx = (r % 4) / 4
        fy = (r // 4 % 2) / 2
        box = [fx * width, fy * height, fx * width + width / 4, fy * height + height / 2]
        reply = chat.ask(QUESTIONS[r % len(QUESTIONS)], [box], max_new_tokens=args.answer_tokens,
                         min_new_tokens=args.answer_tokens)
        stats = reply.stats
        rows.append({"round": r + 1, "prompt_tokens": stats.prompt_tokens, "context_tokens": stats.context_tokens,
                     "generated_tokens": stats.generated_tokens, "prefill_s": stats.prefill_s,
                     "time_to_first_token_s": stats.first_token_s, "decode_s": stats.decode_s,
                     "decode_tokens_per_s": stats.decode_tokens_per_s, "boxes_s": stats.boxes_s,
                     "time_to_boxes_s": stats.total_s, "boxes": len(reply.boxes_xyxy_abs), **decoder_info})
    return rows


def median_rows(runs: list[list[dict]]) -> list[dict]:
    out = []
    for per_round in zip(*runs):
        row = dict(per_round[0])
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = statistics.median(r[key] for r in per_round)
        out.append(row)
    return out


def measure_variant(model, image, args, reuse_cache: bool, **options) -> list[dict]:
    warm_up = argparse.Namespace(**{**vars(args), "rounds": 2})
    run_dialogue(model, image, warm_up, reuse_cache, **options)  # compilation, first launches
    rows = median_rows([run_dialogue(model, image, args, reuse_cache, **options)
                        for _ in range(args.repeats)])
    decode = statistics.median(r["decode_tokens_per_s"] for r in rows)
    print(f"measured {rows[0]['decoder']} reuse_cache={reuse_cache} {options}: {decode:.1f} tokens/s",
          flush=True)  # progress of a long run
    return rows


def kernel_class(name: str) -> str:
    """Coarse class of a CUDA kernel by its name (cuBLAS, the SDPA kernels, inductor's Triton kernels;
    a Triton reduction named after ``mm`` is a matmul written as one, maybe with an RMSNorm fused in)."""
    lowered = name.lower()
    if any(key in lowered for key in ("gemv", "gemm", "nvjet", "xmma", "cublas", "splitk")) or (
            lowered.startswith("triton_red") and "_mm_" in lowered):
        return "matmul (GEMV/GEMM)"
    if any(key in lowered for key in ("fmha", "attention", "flash", "cudnn")):
        return "attention"
    if "triton" in lowered:
        return "inductor-fused"
    if "index" in lowered:
        return "cache write (index_copy)"
    return "other (element-wise, reductions, copies)"


def _profile_steps(decoder, tokens: torch.Tensor, steps: int, context: int):
    from torch.profiler import ProfilerActivity, profile

    decoder.truncate(context)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(tokens)
        torch.cuda.synchronize(tokens.device)
    return prof


@torch.no_grad()
def profile_step(model, args, weight_bytes: int, **decode_options) -> dict:
    """Kernel times of one CUDA-graph decode step at ``args.profile_context`` cached columns, with these
    DecodeOptions (e.g. a compiled fused step with inductor ``compile_options``)."""
    from chatterbox.model.decoding import DecodeOptions, make_kv_decoder

    lm = model.causal_lm
    embed_weight = lm.get_input_embeddings().weight
    device = embed_weight.device
    capacity = min(lm.config.max_position_embeddings, model.cfg.language.model_max_length)
    decoder = make_kv_decoder(lm, 1, capacity, device, embed_weight.dtype, DecodeOptions(**decode_options))
    embeds = torch.randn(1, args.profile_context, lm.config.hidden_size, device=device, dtype=embed_weight.dtype) * 0.02
    decoder.prefill(embeds)
    tokens = torch.tensor([5], device=device)
    steps = 20
    for _ in range(3):  # captures the bucket's graph, then warm replays
        decoder.step(tokens)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        decoder.step(tokens)
    end.record()
    torch.cuda.synchronize(device)
    step_ms = start.elapsed_time(end) / steps
    profiled = 5
    traced = "CUDA-graph replays"
    prof = _profile_steps(decoder, tokens, profiled, args.profile_context)
    if not any(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.key_averages()):
        # Some profiler builds do not trace kernels inside graphs: the same kernels, launched eagerly.
        traced = "eager steps (graph kernels were not traced)"
        decoder._graphs.clear()
        decoder.want_cuda_graph = False
        prof = _profile_steps(decoder, tokens, profiled, args.profile_context)
    kernels: dict[str, list[float]] = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total_us = event.self_device_time_total
        entry = kernels.setdefault(event.key, [0.0, 0])
        entry[0] += total_us / profiled
        entry[1] += event.count / profiled
    classes: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + us
    busy_us = sum(classes.values())
    matmul_us = classes.get("matmul (GEMV/GEMM)", 0.0)
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:15]
    return {"decoder": type(decoder.step_kind).__name__, "compiled_step": decoder.step_kind.compiled,
            "decode_options": {k: v for k, v in decode_options.items() if v is not None}, "profiled": traced,
            "context_columns": args.profile_context,
            "step_ms": step_ms, "kernels_per_step": sum(count for _, count in kernels.values()),
            "kernel_busy_ms": busy_us / 1e3, "idle_between_kernels_ms": step_ms - busy_us / 1e3,
            "ms_by_class": {name: us / 1e3 for name, us in sorted(classes.items(), key=lambda item: -item[1])},
            "matmul_bandwidth_gbs": weight_bytes / (matmul_us * 1e-6) / 1e9 if matmul_us else None,
            "top_kernels": [{"name": name[:160], "us_per_step": us, "launches_per_step": count}
                            for name, (us, count) in top]}


@torch.no_grad()
def compare_steps(model, args, steps: int = 16) -> dict:
    """The fused and transformers' CUDA-graph steps on the same random prompt: how far their hidden
    states are apart and whether lm_head picks the same tokens (a check at the real shapes and dtype)."""
    from chatterbox.model.decoding import DecodeOptions, make_kv_decoder

    lm = model.causal_lm
    embed_weight = lm.get_input_embeddings().weight
    capacity = min(lm.config.max_position_embeddings, model.cfg.language.model_max_length)
    generator = torch.Generator(device=embed_weight.device).manual_seed(0)
    embeds = torch.randn(1, args.profile_context, lm.config.hidden_size, device=embed_weight.device,
                         generator=generator).to(embed_weight.dtype) * 0.02
    tokens = torch.randint(0, embed_weight.shape[0], (steps, 1), device=embed_weight.device, generator=generator)
    hidden = {}
    for name, fused_step in (("fused", True), ("transformers", False)):
        decoder = make_kv_decoder(lm, 1, capacity, embed_weight.device, embed_weight.dtype,
                                  DecodeOptions(fused_step=fused_step))
        decoder.prefill(embeds)
        hidden[name] = torch.stack([decoder.step(t).clone() for t in tokens]).float()
        del decoder
    fused, reference = hidden["fused"], hidden["transformers"]
    return {"steps": steps, "context_columns": args.profile_context,
            "max_abs_diff": float((fused - reference).abs().max()), "max_abs_value": float(reference.abs().max()),
            "same_greedy_token_fraction": float((lm.lm_head(fused.to(embed_weight.dtype)).argmax(-1)
                                                 == lm.lm_head(reference.to(embed_weight.dtype)).argmax(-1))
                                                .float().mean())}


def print_profile(name: str, p: dict) -> None:
    print(f"\nprofile {name} ({p['decoder']}, compiled {p['compiled_step']}, {p['context_columns']} columns, "
          f"{p['profiled']}): "
          f"{p['step_ms']:.2f} ms/step, {p['kernels_per_step']:.0f} kernels, busy {p['kernel_busy_ms']:.2f} ms, "
          f"idle {p['idle_between_kernels_ms']:.2f} ms, matmuls at "
          + (f"{p['matmul_bandwidth_gbs']:.0f} GB/s" if p["matmul_bandwidth_gbs"] else "?"))
    for cls, ms in p["ms_by_class"].items():
        print(f"  {ms:7.3f} ms  {cls}")
    for k in p["top_kernels"][:8]:
        print(f"  {k['us_per_step']:9.1f} us {k['launches_per_step']:5.0f}x  {k['name'][:110]}")


def summarise(rows: list[dict], bound_tokens_per_s: float | None) -> dict:
    decode = statistics.median(r["decode_tokens_per_s"] for r in rows)
    summary = {"decoder": rows[0]["decoder"], "cuda_graph": rows[0]["cuda_graph"],
               "compiled_step": rows[0]["compiled_step"],
               "decode_tokens_per_s_median": decode,
               "round_last_over_round_1_latency": rows[-1]["time_to_boxes_s"] / rows[0]["time_to_boxes_s"],
               "time_to_first_token_s_round_1": rows[0]["time_to_first_token_s"],
               "time_to_first_token_s_last_round": rows[-1]["time_to_first_token_s"]}
    if bound_tokens_per_s:
        summary["decode_fraction_of_bound"] = decode / bound_tokens_per_s
    return summary


def main(argv=None) -> int:
    import transformers
    from PIL import Image, ImageDraw

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_chat: no CUDA device; use --device cpu (with --preset tiny) for a smoke test", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    model, cfg = build_model(args, device, dtype)
    build_s = time.perf_counter() - t0
    image = Image.new("RGB", tuple(args.image_size), (120, 140, 160))
    ImageDraw.Draw(image).ellipse([50, 60, 300, 320], fill=(200, 40, 40))

    weight_bytes = decode_weight_bytes(model)
    bandwidth, bandwidth_source = nominal_bandwidth(device, args.bandwidth_gbs)
    copy_bandwidth = measured_copy_bandwidth(device)
    bound = bandwidth / weight_bytes if bandwidth else None
    measured_bound = copy_bandwidth / weight_bytes if copy_bandwidth else None

    profiles: dict[str, dict] = {}
    variants: dict[str, list[dict]] = {}
    result = {
        "benchmark": "chat latency (bench/bench_chat.py)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "preset": args.preset, "dtype": args.dtype, "tokenizer": args.tokenizer or "tiny (vocabulary 1005)",
        "llm_vocab_rows": model.causal_lm.get_input_embeddings().weight.shape[0],
        "rounds": args.rounds, "answer_tokens": args.answer_tokens, "repeats": args.repeats,
        "image_size": list(args.image_size), "build_s": build_s,
        "decode_weight_bytes": weight_bytes,
        "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": bandwidth_source,
        "measured_copy_bandwidth_bytes_per_s": copy_bandwidth,
        "bound_decode_tokens_per_s": bound, "bound_decode_tokens_per_s_measured_bandwidth": measured_bound,
        "targets": {"decode_fraction_of_bound": 0.6, "round_last_over_round_1_latency": 1.2},
        "variants": {}, "profiles": profiles,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every measurement, so a run stopped by a time limit keeps what it has
        result["variants"] = {name: {"summary": summarise(rows, bound), "rounds": rows}
                              for name, rows in variants.items()}
        if "torch._dynamo" in sys.modules:  # graphs compiled so far (a recompiling step shows here)
            result["dynamo_stats"] = dict(sys.modules["torch._dynamo"].utils.counters["stats"])
        out.write_text(json.dumps(result, indent=2) + "\n")

    def measure(name: str, **options) -> None:
        variants[name] = measure_variant(model, image, args, **options)
        save()

    def profile(name: str, **options) -> None:
        profiles[name] = profile_step(model, args, weight_bytes, **options)
        print_profile(name, profiles[name])
        save()

    profiling = args.profile and device.type == "cuda"
    if profiling:
        profiles["fused_vs_transformers"] = compare_steps(model, args)
        print(f"fused vs transformers' step: {profiles['fused_vs_transformers']}", flush=True)
        profile("transformers_step", **TRANSFORMERS)
        profile("fused_step", **FUSED)
    measure("cache_reuse_fused_step", reuse_cache=True, **FUSED)
    measure("cache_reuse_transformers_step", reuse_cache=True, **TRANSFORMERS)
    if args.compare_uncompiled:
        measure("cache_reuse_fused_step_uncompiled", reuse_cache=True, compile_step=False, **FUSED)
    if not args.no_baseline:
        measure("reencode_every_round_fused_step", reuse_cache=False, **FUSED)
    if args.compile_step:
        measure("cache_reuse_transformers_step_compiled", reuse_cache=True, compile_step=True, **TRANSFORMERS)
    if args.compare_dynamic:
        measure("cache_reuse_dynamic_cache", reuse_cache=True, dynamic_cache=True)
    lora = ""
    if args.merge_lora and hasattr(model.language_model, "merge_adapter"):
        model.language_model.merge_adapter()
        lora = "_merged_lora"
        measure("cache_reuse_merged_lora_fused_step", reuse_cache=True, **FUSED)
        measure("cache_reuse_merged_lora_transformers_step", reuse_cache=True, **TRANSFORMERS)
        if profiling:
            profile("fused_step_merged_lora", **FUSED)
    if profiling:  # last: its compilation (coordinate-descent tuning) is the longest
        profile("fused_step_triton_gemv" + lora, fused_step=True, compile_step=True, compile_options=TRITON_GEMV)

    print(f"{result['device']}: decode reads {weight_bytes / 1e9:.2f} GB per token; bound "
          + (f"{bound:.1f} tokens/s ({bandwidth_source})" if bound else "unknown")
          + (f", {measured_bound:.1f} tokens/s at the measured copy bandwidth" if measured_bound else ""))
    for name, rows in variants.items():
        s = result["variants"][name]["summary"]
        print(f"\n{name} ({s['decoder']}, CUDA graph {'on' if s['cuda_graph'] else 'off'}"
              f"{', compiled step' if s['compiled_step'] else ''}): decode {s['decode_tokens_per_s_median']:.1f} tokens/s"
              + (f" = {s['decode_fraction_of_bound']:.0%} of the bound" if bound else "")
              + f"; round {args.rounds} / round 1 latency {s['round_last_over_round_1_latency']:.2f}")
        print("round  prompt  context  TTFT_s  decode_tok/s  boxes_s  total_s")
        for r in rows:
            print(f"{r['round']:>5}  {r['prompt_tokens']:>6}  {r['context_tokens']:>7}  "
                  f"{r['time_to_first_token_s']:.4f}"
                  f"  {r['decode_tokens_per_s']:>12.1f}  {r['boxes_s']:.4f}  {r['time_to_boxes_s']:.4f}")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
