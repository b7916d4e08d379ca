#!/usr/bin/env python
"""Stage-2 training-step throughput of ChatterBox on one GPU, ours vs upstream's configuration.

    python bench/bench_train_step.py --compare --modes ours,upstream-1engine --out outputs/bench_train  # one GPU
    python bench/bench_train_step.py --mode ours --preset 13b --json r.json  # one mode, one process
    python bench/bench_train_step.py --tiny                                   # CPU smoke run

Model: the preset (13b = LLaMA-2-13B + CLIP-L/14 + GroundingDINO Swin-B) with random weights, LoRA and
the trainable policy of training; through the project's DeepSpeed ZeRO-2 engine (chatterbox.train.engine).
Batches have the real shapes (micro-batch 6; DINO 512²; CLIP 224²) and random lengths and counts drawn per
row, an assumption from the data recipe (1 BOS + 258 image positions + text):

* grounding: 40-90 text tokens (system prompt ~35 + question + short answer) -> 299-349 tokens; one `[VG]`
  per sample (upstream's readers retry until there is exactly one); boxes per query drawn from
  ``GROUNDING_BOXES_PER_QUERY`` (71% one, 3.7% more than the grounding graphs' 8, so about one grounding
  micro-step in five takes the eager path);
* referring: 300-420 text tokens (multi-round CB-MRG / VG region dialogues, 1-4 `<bbox>` regions)
  -> 559-679 tokens;
* vqa: 200-420 text tokens (LLaVA-instruct conversations) -> 459-679 tokens.

Every micro-step gets a batch of its own (none is seen twice unless --distinct-batches caps them), so graph
captures for new query counts, recompiles and the eager fallback fall inside the timed steps.

Modes (each in its own process):
* ``ours``: bf16, SDPA attention (causal flash kernel: right padding needs no mask), gradient
  checkpointing only on as many LLM layers as memory needs (planned from the measured activation bytes
  per token), vision-branch checkpointing off, the frozen CLIP and Swin replayed from CUDA graphs
  (train.cuda_graph_frozen_encoders), the grounding step's vision part and loss replayed from CUDA graphs
  (train.cuda_graph_grounding_loss), the LLM layers and the vision encoder, text, decoder and fusion layers
  compiled (train.compile_layers=all, chatterbox.accel.compilable_blocks), ONE engine; ``ours-eager-grounding``:
  the same with the grounding step's vision part run eagerly, hence its fusion layers not compiled;
  ``ours-uncompiled``: ``ours`` without compiling, ``ours-eager-encoders``: that with the encoders and the
  grounding step run eagerly too;
* ``upstream-1engine`` (the baseline): upstream's configuration on our model code: fp16 with dynamic loss
  scaling, eager attention, gradient checkpointing of every LLM layer and of the vision transformer, the
  encoders and the grounding step eager, nothing compiled, one engine, three host syncs per micro-step
  (upstream's loss meters read ``loss``, ``vg_loss`` and ``vqa_loss`` with ``.item()``), one box per
  grounding query (all its code can run: spec §5.10); ``upstream``: the same with THREE engines built around
  the one model (referring, VQA, grounding; all work through the last), as upstream's stage 2 does. On
  upstream's DeepSpeed 0.11.1 only the last engine's gradient hooks fire, so one engine takes the same step
  time (bench/check_three_engines.py); on DeepSpeed 0.19.8 all three engines' hooks fire, and at 13b size
  ZeRO-2 stops at the second micro-step ("Gradient computed twice"), hence the one-engine baseline.

Deviations of the baseline from upstream's own code, all in upstream's favour: it runs our vision branch
and grounding criterion, which batch every query of a micro-batch (upstream loops over samples) and match
all decoder layers with one device->host copy per step (upstream copies one cost matrix per sample per
layer); our data contract (no per-sample Python conversions inside the step); DeepSpeed 0.19.8, not 0.11.1;
transformers' current LLaMA, not 4.31's.

Timing: one warm-up accumulation cycle per stream, then ``--repeats`` rounds of one cycle (``--gas``
micro-steps) per stream in turn, so the streams interleave as in stage 2. Per stream: the median micro-step
(forward + engine.backward + engine.step inside a cycle) with its quartiles and per-round medians, the
extra time of the step that ends a cycle (optimizer), and the time per micro-batch amortised over
upstream's 20 accumulation steps; samples/s, tokens/s (real tokens), and MFU of the LLM part =
bench.flops.llm_step_flops (formula there) / time / the card's **rated** dense bf16 peak
(``RATED_BF16_DENSE_TFLOPS``; the measured matmul peak beside it), over the whole training micro-step and
over the LLM's own forward+backward timed alone. The stage-2 mix weights streams by upstream's cadence: per
10 global steps 10 grounding, 1 referring, 2 VQA cycles. ``--compare`` alternates the modes'
processes ``--process-repeats`` times and reports ratios of the medians over processes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from chatterbox.conversation import IGNORE_INDEX  # noqa: E402
from chatterbox.tokens import (BBOX_TOKEN, IMAGE_END_TOKEN, IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN,  # noqa: E402
                               NUM_IMAGE_PATCHES, VG_TOKEN, SpecialTokenIds)
from model.GroundingDINO.matcher import DEVICE_MAX_TARGETS  # noqa: E402

STREAMS = ("grounding", "referring", "vqa")
#: optimizer steps of each stream per 10 global steps of stage 2 (spec/upstream.md §2.5)
STAGE2_CADENCE = {"referring": 1, "grounding": 10, "vqa": 2}
UPSTREAM_ACCUMULATION = 20
#: ours (the 13b/7b configs' settings); that with the grounding step's vision part run eagerly; ours without
#: compiled blocks; that with the frozen encoders and the grounding step run eagerly too; upstream (fp16, eager,
#: full checkpointing, three engines); the same with one engine
MODES = ("ours", "ours-eager-grounding", "ours-uncompiled", "ours-eager-encoders", "upstream", "upstream-1engine")
COMPILED_MODES = ("ours", "ours-eager-grounding")


# ----------------------------------------------------------------------------------------------------
# shapes
#: Boxes per grounding query (`[VG]`), an assumption from the data recipe (no dataset here to count them):
#: upstream's grounding mixture draws RefCOCO GND, COCO GND, CB GND and CB LC at 5 : 8 : 1 : 1 (spec §3.4);
#: all but COCO GND give one box per query; COCO GND gives every box of the answer's category, taken here
#: as distributed like COCO's instances per (image, category) pair: 45% one, 55% more, 7% more than 8
#: (the grounding graphs' limit, past which the step runs eagerly).
COCO_GND_BOXES = {1: 0.45, 2: 0.20, 3: 0.10, 4: 0.06, 5: 0.04, 6: 0.03, 7: 0.03, 8: 0.02, 10: 0.03, 12: 0.02,
                  16: 0.02}
GROUNDING_BOXES_PER_QUERY = {k: (7 / 15 if k == 1 else 0.0) + 8 / 15 * w for k, w in COCO_GND_BOXES.items()}


@dataclass(frozen=True)
class StreamShape:
    text_tokens: tuple[int, int]  # inclusive range of text tokens after BOS + image block
    vg_per_row: tuple[int, int] = (0, 0)
    boxes_per_vg: dict[int, float] = field(default_factory=lambda: {1: 1.0})  # box count -> probability
    regions_per_row: tuple[int, int] = (0, 0)
    answer_fraction: float = 0.4  # trailing share of the text that is supervised (assistant replies)


#: Every grounding sample of upstream's readers has exactly one `[VG]` (they retry until it does).
STREAM_SHAPES = {
    "grounding": StreamShape(text_tokens=(40, 90), vg_per_row=(1, 1), boxes_per_vg=GROUNDING_BOXES_PER_QUERY),
    "referring": StreamShape(text_tokens=(300, 420), regions_per_row=(1, 4)),
    "vqa": StreamShape(text_tokens=(200, 420), answer_fraction=0.6),
}
#: Upstream's step runs only one box per query (a query with more fails on its one-hot labels, spec §5.10):
#: its grounding batches have the same lengths with one box per query.
UPSTREAM_STREAM_SHAPES = {**STREAM_SHAPES, "grounding": StreamShape(text_tokens=(40, 90), vg_per_row=(1, 1))}


class LlamaShapedTokenizer:
    """The parts of the LLaMA-2 tokenizer + ChatterBox tokens that the model reads, without its files.

    Ids as upstream: base vocabulary ``base_vocab`` (32000), then `[VG]`, `<im_patch>`, `<im_start>`,
    `<im_end>`, `<bbox>`; unk = pad = 0, BOS 1, EOS 2. Benchmarks only (it cannot encode text).
    """

    ADDED = (VG_TOKEN, IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, BBOX_TOKEN)

    def __init__(self, base_vocab: int = 32000):
        self.base_vocab = base_vocab
        self.added = {token: base_vocab + i for i, token in enumerate(self.ADDED)}
        self.unk_token_id = self.pad_token_id = 0
        self.bos_token_id, self.eos_token_id = 1, 2
        self.unk_token = self.pad_token = "<unk>"
        self.padding_side = "right"

    def __len__(self) -> int:
        return self.base_vocab + len(self.ADDED)

    def convert_tokens_to_ids(self, tokens):
        return [self.added.get(t, self.unk_token_id) for t in tokens]

    def __call__(self, text, add_special_tokens: bool = False):
        if text not in self.added:
            raise ValueError("LlamaShapedTokenizer only knows ChatterBox's added tokens")
        return {"input_ids": [self.added[text]]}

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_batch(ids: SpecialTokenIds, shape: StreamShape, task: str, micro_batch: int, text_vocab: int,
                clip_size: int, dino_size: int | None, generator: torch.Generator,
                num_patches: int = NUM_IMAGE_PATCHES) -> dict:
    """One collated batch of the data contract (docs/model.md) with random content of ``shape``."""

    def draw(low_high: tuple[int, int]) -> int:
        low, high = low_high
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    rows, labels, region_boxes_xyxy_clip_norm, grounding_targets_cxcywh_norm = [], [], [], []
    for _ in range(micro_batch):
        n_text = draw(shape.text_tokens)
        text = torch.randint(3, text_vocab, (n_text,), generator=generator)
        answer_start = n_text - max(2, int(n_text * shape.answer_fraction))
        n_regions = draw(shape.regions_per_row)
        n_vg = draw(shape.vg_per_row)
        if n_regions:  # `<bbox>` tokens sit in the user turns, before the answer
            where = torch.randperm(answer_start - 1, generator=generator)[:n_regions].sort().values
            text[where] = ids.bbox
            xy = torch.rand(n_regions, 2, generator=generator) * 0.6
            wh = 0.05 + torch.rand(n_regions, 2, generator=generator) * 0.35
            region_boxes_xyxy_clip_norm.append(torch.cat([xy, xy + wh], dim=1))
        else:
            region_boxes_xyxy_clip_norm.append(torch.zeros(0, 4))
        targets = []
        if n_vg:  # `[VG]` in the answer, never first (its query is read from the token before it)
            span = n_text - 1 - (answer_start + 1)
            where = answer_start + 1 + torch.randperm(span, generator=generator)[:n_vg].sort().values
            text[where] = ids.vg
            counts, weights = list(shape.boxes_per_vg), torch.tensor(list(shape.boxes_per_vg.values()))
            for _ in range(n_vg):
                k = counts[int(torch.multinomial(weights, 1, generator=generator))]
                centre = 0.2 + torch.rand(k, 2, generator=generator) * 0.6
                size = 0.05 + torch.rand(k, 2, generator=generator) * 0.3
                targets.append(torch.cat([centre, size], dim=1))
        grounding_targets_cxcywh_norm.append(targets)
        text[-1] = ids.eos
        row = torch.cat([torch.tensor([ids.bos, ids.im_start]), torch.full((num_patches,), ids.im_patch),
                         torch.tensor([ids.im_end]), text])
        label = torch.full_like(row, IGNORE_INDEX)
        prefix = len(row) - n_text
        label[prefix + answer_start:] = row[prefix + answer_start:]
        rows.append(row)
        labels.append(label)
    length = max(len(r) for r in rows)
    input_ids = torch.full((micro_batch, length), ids.pad, dtype=torch.long)
    attention_mask = torch.zeros((micro_batch, length), dtype=torch.long)
    label_tensor = torch.full((micro_batch, length), IGNORE_INDEX, dtype=torch.long)
    for b, (row, label) in enumerate(zip(rows, labels)):
        input_ids[b, :len(row)] = row
        attention_mask[b, :len(row)] = 1
        label_tensor[b, :len(row)] = label
    has_grounding = any(grounding_targets_cxcywh_norm)
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, labels=label_tensor,
        images_clip=torch.randn(micro_batch, 3, clip_size, clip_size, generator=generator),
        images_dino=(torch.randn(micro_batch, 3, dino_size, dino_size, generator=generator)
                     if has_grounding and dino_size else None),
        offset=torch.arange(micro_batch + 1), image_sizes_hw=torch.tensor([[480, 640]] * micro_batch),
        region_boxes_xyxy_clip_norm=region_boxes_xyxy_clip_norm,
        grounding_targets_cxcywh_norm=grounding_targets_cxcywh_norm, task=[task] * micro_batch,
        sample_ids=[f"bench/{task}#{b}" for b in range(micro_batch)],
    )


def stream_batches(model, cfg, stream: str, micro_batch: int, count: int, generator: torch.Generator,
                   device: torch.device, dtype: torch.dtype, shapes: dict = STREAM_SHAPES) -> list[dict]:
    """``count`` batches of ``stream`` with ``shapes[stream]`` and random content for ``model`` (its
    tokenizer's text ids, the config's image sizes; DINO images only for grounding), moved to ``device``."""
    from chatterbox.train.loop import move_batch

    text_vocab = min(cfg.language.vocab_size, len(model.tokenizer) - 5)
    dino = cfg.vision.image_size if stream == "grounding" else None
    return [move_batch(build_batch(model.token_ids, shapes[stream], stream, micro_batch, text_vocab,
                                   cfg.clip.image_size, dino, generator, model.clip_tower.num_patches), device, dtype)
            for _ in range(count)]


def most_boxes_per_query(batch: dict) -> int:
    return max((len(t) for row in batch["grounding_targets_cxcywh_norm"] for t in row), default=0)


def row_lengths(batch: dict) -> list[int]:
    return [int(n) for n in batch["attention_mask"].sum(dim=1)]


# ----------------------------------------------------------------------------------------------------
# memory plan and timing helpers
def plan_checkpoint_layers(tokens: int, act_bytes_per_token: float, num_layers: int, free_bytes: float,
                           checkpointed_fraction: float = 0.1) -> int:
    """Fewest LLM layers to checkpoint so that ``tokens`` fit in ``free_bytes`` of activation memory.

    ``act_bytes_per_token`` is the measured activation memory per token with no checkpointing (all
    layers); a checkpointed layer is assumed to keep ``checkpointed_fraction`` of its activations (its
    input; the recompute of one layer at a time is transient).
    """
    per_layer = act_bytes_per_token / num_layers
    for k in range(num_layers + 1):
        need = tokens * per_layer * ((num_layers - k) + checkpointed_fraction * k)
        if need <= free_bytes:
            return k
    return num_layers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, size: int = 8192, reps: int = 20) -> float:
    """bf16 matmul TFLOP/s of ``size``³ products on random data (median of ``reps`` after warm-up)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(times) / 1e12


#: Rated dense bf16 tensor-core peak (TFLOP/s, without sparsity) by device-name fragment, most specific first:
#: NVIDIA's H100 / H200 / A100 datasheets.
RATED_BF16_DENSE_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                           ("A100", 312.0))


def rated_bf16_peak(device_name: str, measured_tflops: float) -> tuple[float, str]:
    """The card's rated dense bf16 peak; off the table (the CPU, other cards) the measured peak stands in."""
    for fragment, tflops in RATED_BF16_DENSE_TFLOPS:
        if fragment in device_name:
            return tflops, f"datasheet ({fragment})"
    return measured_tflops, "measured (no rated peak known for this device)"


def quartiles(values: list[float]) -> list[float]:
    """min, 25%, 50%, 75%, max."""
    if len(values) < 2:
        return [values[0]] * 5 if values else []
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [min(values), q1, q2, q3, max(values)]


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def private_pool_gb(device: torch.device) -> float | None:
    """GiB held in the caching allocator's private pools (CUDA graphs), from its segment snapshot."""
    if device.type != "cuda":
        return None
    segments = torch.cuda.memory_snapshot()
    if segments and "segment_pool_id" not in segments[0]:
        return None
    return sum(seg["total_size"] for seg in segments if tuple(seg["segment_pool_id"]) != (0, 0)) / 2**30


# ----------------------------------------------------------------------------------------------------
# one mode
@dataclass
class StreamResult:
    stream: str
    micro_batch: int
    mean_tokens: float  # real tokens per micro-batch
    mean_padded_length: float
    checkpointed_layers: int
    micro_step_s: float  # median forward+backward+engine.step inside an accumulation cycle
    optimizer_extra_s: float  # extra time of the micro-step that ends the cycle
    amortised_s: float  # per micro-batch with 20 accumulation steps
    samples_per_s: float
    tokens_per_s: float
    llm_tflop: float  # model FLOPs of the LLM part per micro-batch (bench.flops)
    mfu_step: float  # llm_tflop / amortised_s / the card's rated dense bf16 peak
    mfu_step_measured_peak: float | None = None  # the same against the measured matmul peak
    llm_only_s: float | None = None  # LLM forward+backward (lm_head + CE included) timed alone
    mfu_llm_only: float | None = None  # against the rated peak
    peak_memory_gb: float | None = None
    error: str | None = None
    # every timed micro-step (seconds): inside a cycle / ending one, in the order they ran
    times_s: list[float] = field(default_factory=list)
    boundary_times_s: list[float] = field(default_factory=list)
    micro_step_quartiles_s: list[float] = field(default_factory=list)  # min, 25%, 50%, 75%, max
    round_medians_s: list[float] = field(default_factory=list)  # median micro-step of each timed round
    steps_over_graph_box_limit: int = 0  # timed micro-steps with a query of more boxes than the graphs take


def build_model(args, mode: str, device: torch.device, dtype: torch.dtype):
    from chatterbox import accel
    from chatterbox.model.chatterbox import ChatterBox
    from chatterbox.model.presets import preset
    from chatterbox.model.weights import build_tokenizer

    cfg = preset(args.preset)
    cfg.language.attn_implementation = "eager" if mode.startswith("upstream") else "sdpa"
    cfg.language.gradient_checkpointing = mode.startswith("upstream")
    cfg.language.gradient_checkpointing_layers = -1
    if not mode.startswith("upstream"):
        cfg.vision.use_transformer_ckpt = False
        cfg.vision.fusion_use_checkpoint = False
    tokenizer = build_tokenizer(cfg) if args.preset == "tiny" else LlamaShapedTokenizer(cfg.language.vocab_size)
    torch.manual_seed(args.seed)
    # Built on the device in the training dtype: a 13B random init on the host would take minutes.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ChatterBox.build(cfg, tokenizer=tokenizer, verbose=False)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=dtype)
    # As training does on a GPU (train.cuda_graph_frozen_encoders); upstream runs them eagerly.
    accel.use_frozen_encoder_graphs(model, mode.startswith("ours") and mode != "ours-eager-encoders")
    # train.cuda_graph_grounding_loss (on for GPUs)
    eager_grounding = ("ours-eager-encoders", "ours-eager-grounding")
    accel.use_grounding_loss_graphs(model, device.type == "cuda" and mode.startswith("ours")
                                    and mode not in eager_grounding,
                                    query_chunk=getattr(args, "graph_query_chunk", 2),
                                    query_multiple=getattr(args, "graph_query_multiple", 2))
    backend = getattr(args, "compile_backend", "inductor")
    if mode in COMPILED_MODES:  # train.compile_layers: all (the 13b/7b configs' setting)
        accel.compile_layers(model, backend=backend)
    return model, cfg


def llm_only_time(model, batch: dict, reps: int, device: torch.device) -> float:
    """Median forward+backward of the LLM alone (decoder, lm_head, CE) on the batch's embeddings."""
    from chatterbox.model.chatterbox import causal_mask_suffices

    with torch.no_grad():
        embeds = model.build_inputs_embeds(batch["input_ids"], batch["images_clip"], batch["offset"],
                                           batch["region_boxes_xyxy_clip_norm"], batch["sample_ids"])
    embeds = embeds.detach().requires_grad_(True)
    mask = causal_mask_suffices(batch["attention_mask"])
    times = []
    for i in range(reps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        hidden = model.causal_lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        model._lm_loss(hidden, batch["labels"]).backward()
        synchronize(device)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
        del hidden
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def run_mode(args) -> dict:
    from chatterbox.config import StreamConfig, TrainConfig
    from bench.flops import llm_matmul_params, llm_step_flops
    from chatterbox.train.distributed import init_distributed
    from chatterbox.train.engine import build_engine, use_stream
    from chatterbox.train.loop import PRECISION_DTYPES

    mode = args.mode
    upstream_like = mode.startswith("upstream")
    if args.hang_dump:
        import faulthandler

        faulthandler.dump_traceback_later(args.hang_dump, exit=False)
    dist = init_distributed(args.device)
    device = dist.device
    on_gpu = device.type == "cuda"
    precision = ("fp16" if upstream_like else "bf16") if on_gpu else "bf16"  # no fp16 on CPU DeepSpeed
    dtype = PRECISION_DTYPES[precision]
    result: dict = {"mode": mode, "preset": args.preset, "precision": precision, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                    "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    try:
        import deepspeed
        result["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    result["bf16_matmul_peak_tflops"] = measure_matmul_peak(device, args.peak_size, args.peak_reps)
    measured_flops = result["bf16_matmul_peak_tflops"] * 1e12
    result["rated_bf16_dense_tflops"], result["rated_peak_source"] = rated_bf16_peak(result["device_name"],
                                                                                      result["bf16_matmul_peak_tflops"])
    rated_flops = result["rated_bf16_dense_tflops"] * 1e12

    t0 = time.perf_counter()
    model, cfg = build_model(args, mode, device, dtype)
    model.train()
    if on_gpu:
        # Load + self-test the deformable-attention kernel now, outside any checkpointed region: its
        # first use inside a checkpointed vision encoder deadlocks (the self-test's backward triggers a
        # recompute that re-enters the op's lock; seen on an H200, 2026-11-26).
        from model.GroundingDINO.ms_deform_attn import kernel_status

        result["msda_kernel"] = kernel_status(device) or "cuda kernel"
    synchronize(device)
    result["build_seconds"] = time.perf_counter() - t0
    print(f"[{mode}] {result['device_name']}: bf16 matmul peak {result['bf16_matmul_peak_tflops']:.0f} TFLOP/s; "
          f"model built in {result['build_seconds']:.1f} s", flush=True)
    counts = llm_matmul_params(model.causal_lm)
    result["llm_matmul_params"] = asdict(counts)
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_layers = counts.num_layers
    streams = [s for s in args.streams.split(",") if s]
    unknown = sorted(set(streams) - set(STREAMS))
    if unknown:
        raise SystemExit(f"--streams: unknown {unknown}; known {list(STREAMS)}")
    streams.sort(key=STREAMS.index)  # grounding first: its activation memory calibrates the plan

    generator = torch.Generator().manual_seed(args.seed)
    # A batch of its own for every micro-step (warm-up included) unless --distinct-batches caps them.
    count = args.distinct_batches or args.gas * (1 + args.repeats)
    shapes = UPSTREAM_STREAM_SHAPES if upstream_like else STREAM_SHAPES
    batches = {s: stream_batches(model, cfg, s, args.micro_batch, count, generator, device, dtype, shapes)
               for s in streams}

    # Phase A: the LLM alone, before the engine exists; calibrates activation bytes per token.
    capacity = torch.cuda.get_device_properties(device).total_memory if on_gpu else None
    engine_extra = 16 * result["trainable_parameters"] + 2 * 2 * 5e8  # fp32 grads + Adam m,v; 2 grad buckets
    checkpoint_plan: dict[str, int] = {}
    llm_only: dict[str, float] = {}
    act_per_token = None
    base_memory = torch.cuda.memory_allocated(device) if on_gpu else 0  # weights + batches
    stream_tokens = {s: max(b["input_ids"].numel() for b in batches[s]) for s in streams}
    for s in streams:
        tokens = stream_tokens[s]
        if upstream_like:
            k = num_layers
        elif act_per_token is None or not on_gpu:
            k = 0
        else:
            free = args.memory_fraction * capacity - base_memory - engine_extra
            k = plan_checkpoint_layers(tokens, act_per_token, num_layers, free)
        model.set_gradient_checkpointing(k)
        reset_peak(device)
        try:
            llm_only[s] = llm_only_time(model, batches[s][0], args.llm_only_reps, device)
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            k = num_layers
            model.set_gradient_checkpointing(k)
            llm_only[s] = llm_only_time(model, batches[s][0], args.llm_only_reps, device)
        checkpoint_plan[s] = k
        print(f"[{mode}] {s}: LLM alone {llm_only[s]:.3f} s with {k} checkpointed layers", flush=True)
        if on_gpu and k == 0 and act_per_token is None:
            act_per_token = (torch.cuda.max_memory_allocated(device) - base_memory) / tokens
    result["activation_bytes_per_token"] = act_per_token
    result["checkpoint_plan_before_warmup"] = dict(checkpoint_plan)
    result["checkpoint_plan"] = checkpoint_plan

    def replan() -> bool:
        """After a warm-up round: plan again against what stays resident between steps (weights, optimizer
        state, the CUDA graphs' pools) instead of the estimate. Returns whether any stream's plan changed."""
        if not on_gpu or upstream_like or act_per_token is None:
            return False
        resident = torch.cuda.memory_allocated(device)
        free = args.memory_fraction * capacity - resident
        result.setdefault("resident_gb_after_warmup", []).append(resident / 2**30)
        result.setdefault("graph_pool_gb_after_warmup", []).append(private_pool_gb(device))
        changed = False
        for t in streams:
            k = plan_checkpoint_layers(stream_tokens[t], act_per_token, num_layers, free)
            changed |= k != checkpoint_plan[t]
            checkpoint_plan[t] = k
        print(f"[{mode}] after warm-up: {resident / 2**30:.1f} GiB resident "
              f"({result['graph_pool_gb_after_warmup'][-1]} GiB in graph pools); plan {checkpoint_plan}", flush=True)
        return changed

    # Phase B: the whole training micro-step through the engine(s). One warm-up accumulation cycle per
    # stream, then ``repeats`` rounds of one cycle per stream in turn, every micro-step on a batch of its own.
    def stream_config():
        return StreamConfig(micro_batch_size=args.micro_batch, gradient_accumulation_steps=args.gas, every_n_steps=1)

    train = TrainConfig(stage=2, precision=precision, streams={s: stream_config() for s in streams})
    if on_gpu:
        torch.cuda.empty_cache()
    memory_before_engine = torch.cuda.memory_allocated(device) if on_gpu else 0
    engine_order = ("referring", "vqa", "grounding") if mode == "upstream" else ("grounding",)
    engines = []
    for name in engine_order:  # upstream: one engine per stream around the same model; the last trains
        one = TrainConfig(stage=2, precision=precision, streams={name: stream_config()})
        engines.append(build_engine(model, one, dist.world_size)[0])
    engine = engines[-1]
    result["engines"] = len(engines)
    if on_gpu:
        result["engine_memory_gb"] = (torch.cuda.memory_allocated(device) - memory_before_engine) / 2**30
        print(f"[{mode}] {len(engines)} engine(s) hold {result['engine_memory_gb']:.1f} GiB", flush=True)

    timed = {s: {"times": [], "boundary": [], "rounds": [], "flops": [], "tokens": [], "over_limit": 0,
                 "error": None} for s in streams}
    peaks: dict[str, float | None] = {}
    # Round 0 warms up (allocates the optimizer state, captures graphs); when the plan it leads to differs,
    # one more warm-up round runs under the new plan, so that no timed round pays for a recompile it caused.
    rounds = [0] + list(range(1, 1 + args.repeats))
    position = 0
    while position < len(rounds):
        round_index = rounds[position]
        position += 1
        for s in streams:
            record = timed[s]
            if record["error"]:
                continue
            use_stream(engine, train.streams[s], dist.world_size)
            model.set_gradient_checkpointing(checkpoint_plan[s])
            reset_peak(device)
            round_times = []
            try:
                for i in range(args.gas):
                    batch = batches[s][(round_index * args.gas + i) % len(batches[s])]
                    synchronize(device)
                    t0 = time.perf_counter()
                    out = engine(**batch)
                    engine.backward(out["loss"])
                    engine.step()
                    if upstream_like:  # upstream's loss meters read three losses every micro-step
                        out["loss"].item(), out["grounding_loss"].item(), out["lm_loss"].item()
                    synchronize(device)
                    elapsed = time.perf_counter() - t0
                    if round_index == 0:
                        continue
                    (record["boundary"] if i == args.gas - 1 else record["times"]).append(elapsed)
                    round_times.append(elapsed)
                    lm_loss = not model.lm_loss_is_zeroed(batch["grounding_targets_cxcywh_norm"])
                    record["flops"].append(llm_step_flops(counts, row_lengths(batch), lm_loss=lm_loss))
                    record["tokens"].append(sum(row_lengths(batch)))
                    record["over_limit"] += most_boxes_per_query(batch) > DEVICE_MAX_TARGETS
            except torch.OutOfMemoryError as oom:
                record["error"] = f"out of memory: {str(oom).splitlines()[0]}"
            except Exception as failure:  # noqa: BLE001 - report it and go on with the next stream
                record["error"] = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
                traceback.print_exc()
            if round_times:
                record["rounds"].append(statistics.median(round_times))
            peaks[s] = max(peaks.get(s) or 0.0, peak_memory_gb(device) or 0.0) if on_gpu else None
            print(f"[{mode}] round {round_index} {s}: micro-steps " + ", ".join(f"{t:.3f}" for t in round_times)
                  + (f" error {record['error']}" if record["error"] else ""), flush=True)
        if round_index == 0:
            out = None  # nothing of the last step stays alive while the resident memory is read
            if replan() and position == 1:
                rounds.insert(position, 0)
                for s in streams:  # a warm-up that ran out of memory under the old plan gets its try under the new
                    if (timed[s]["error"] or "").startswith("out of memory"):
                        timed[s]["error"] = None

    per_stream: list[StreamResult] = []
    for s in streams:
        record = timed[s]
        times, boundary_times = record["times"], record["boundary"]
        if record["error"] or not times:
            per_stream.append(StreamResult(s, args.micro_batch, 0, 0, checkpoint_plan[s], math.nan, math.nan,
                                           math.nan, 0, 0, 0, 0, peak_memory_gb=peaks.get(s),
                                           error=record["error"] or "no timed micro-steps (raise --repeats / --gas)"))
            continue
        micro = statistics.median(times)
        extra = max(0.0, statistics.median(boundary_times) - micro) if boundary_times else 0.0
        amortised = micro + extra / UPSTREAM_ACCUMULATION
        mean_tokens = statistics.mean(record["tokens"])
        llm_flops = statistics.mean(record["flops"])
        ref = batches[s][0]
        llm_alone = llm_only[s]
        per_stream.append(StreamResult(
            stream=s, micro_batch=args.micro_batch, mean_tokens=mean_tokens,
            mean_padded_length=statistics.mean(b["input_ids"].shape[1] for b in batches[s]),
            checkpointed_layers=checkpoint_plan[s], micro_step_s=micro, optimizer_extra_s=extra,
            amortised_s=amortised, samples_per_s=args.micro_batch / amortised, tokens_per_s=mean_tokens / amortised,
            llm_tflop=llm_flops / 1e12, mfu_step=llm_flops / amortised / rated_flops,
            mfu_step_measured_peak=llm_flops / amortised / measured_flops, llm_only_s=llm_alone,
            mfu_llm_only=llm_step_flops(counts, row_lengths(ref)) / llm_alone / rated_flops,
            peak_memory_gb=peaks.get(s), times_s=times, boundary_times_s=boundary_times,
            micro_step_quartiles_s=quartiles(times), round_medians_s=record["rounds"],
            steps_over_graph_box_limit=record["over_limit"]))
    result["streams"] = [asdict(r) for r in per_stream]
    result["stage2"] = stage2_summary(per_stream)
    if mode in COMPILED_MODES:
        from torch._dynamo.utils import counters

        result["compile"] = {"stats": dict(counters["stats"]), "graph_breaks": sum(counters["graph_break"].values()),
                             "graph_break_reasons": [r.splitlines()[0] for r in counters["graph_break"]][:10]}
        print(f"[{mode}] compile: {result['compile']}", flush=True)
    return result


def stage2_summary(per_stream: list[StreamResult]) -> dict | None:
    """Cadence-weighted stage-2 mix over the streams that ran (upstream's 10 : 1 : 2 optimizer steps)."""
    ok = [r for r in per_stream if r.error is None and r.stream in STAGE2_CADENCE]
    if not ok:
        return None
    weights = {r.stream: STAGE2_CADENCE[r.stream] for r in ok}
    seconds = sum(weights[r.stream] * r.amortised_s for r in ok)
    samples = sum(weights[r.stream] * r.micro_batch for r in ok)
    tokens = sum(weights[r.stream] * r.mean_tokens for r in ok)
    flops = sum(weights[r.stream] * r.llm_tflop for r in ok) * 1e12
    mfu = sum(weights[r.stream] * r.mfu_step * r.amortised_s for r in ok) / seconds
    return {"streams": sorted(weights, key=STREAMS.index), "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds, "llm_tflops_per_s": flops / seconds / 1e12, "mfu_step": mfu}


# ----------------------------------------------------------------------------------------------------
# driver
def format_table(results: dict[str, dict]) -> str:
    lines = ["| run | stream | ckpt layers | tokens/mb | micro-step s: median (min-max) | opt. extra s | samples/s | "
             "tokens/s | LLM TFLOP/mb | MFU step: rated (measured peak) | LLM alone s | MFU LLM alone | "
             "steps > box limit | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, res in results.items():
        if "error" in res:
            lines.append(f"| {run} | failed: {res['error']} |" + " |" * 12)
            continue
        for r in res["streams"]:
            if r["error"]:
                lines.append(f"| {run} | {r['stream']} | {r['checkpointed_layers']} | {r['error']} |" + " |" * 10)
                continue
            mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
            low, *_, high = r["micro_step_quartiles_s"]
            lines.append(
                f"| {run} | {r['stream']} | {r['checkpointed_layers']} | {r['mean_tokens']:.0f} | "
                f"{r['micro_step_s']:.3f} ({low:.3f}-{high:.3f}) | {r['optimizer_extra_s']:.3f} | "
                f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['llm_tflop']:.1f} | "
                f"{100 * r['mfu_step']:.1f}% ({100 * r['mfu_step_measured_peak']:.1f}%) | {r['llm_only_s']:.3f} | "
                f"{100 * r['mfu_llm_only']:.1f}% | {r['steps_over_graph_box_limit']} | {mem} |")
        if res.get("stage2"):
            st = res["stage2"]
            lines.append(f"| {run} | stage-2 mix ({'+'.join(st['streams'])}) | | | | | {st['samples_per_s']:.2f} | "
                         f"{st['tokens_per_s']:.0f} | | {100 * st['mfu_step']:.1f}% | | | | |")
    return "\n".join(lines)


def run_process(args, mode: str, path: Path) -> dict:
    """One mode in a process of its own; its result (or an error entry)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--json", str(path)]
    if args.mode_timeout:
        cmd += ["--hang-dump", str(max(1, args.mode_timeout - 20))]
    for key in ("preset", "device", "streams", "micro_batch", "gas", "repeats", "distinct_batches",
                "llm_only_reps", "peak_size", "peak_reps", "seed", "memory_fraction", "graph_query_chunk",
                "graph_query_multiple"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    print("+ " + " ".join(cmd), flush=True)  # the child prints its progress and table
    started = time.perf_counter()
    try:
        code = subprocess.run(cmd, env=os.environ.copy(), timeout=args.mode_timeout or None).returncode
    except subprocess.TimeoutExpired:
        code = f"timed out after {args.mode_timeout} s"
    result = json.loads(path.read_text()) if code == 0 and path.is_file() else {"error": f"exit code {code}"}
    result["wall_seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(result, indent=1))
    return result


def median_of(results: list[dict], pick) -> float | None:
    values = [v for v in (pick(r) for r in results if "error" not in r) if v is not None]
    return statistics.median(values) if values else None


def compare(args) -> dict:
    """The modes in alternation, ``--process-repeats`` processes each (ours, upstream, ours, upstream, ...);
    a process whose result file is already in --out is not run again, so a comparison can be completed
    over several sessions. Ratios are of the medians over the processes."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    if "ours" not in modes or not set(modes) <= set(MODES):
        raise SystemExit(f"--modes {args.modes!r}: 'ours' plus any of {list(MODES[1:])}")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for repeat in range(args.process_repeats):
        for mode in modes:
            path = out_dir / f"bench_train_{mode}_{repeat}.json"
            runs[mode].append(json.loads(path.read_text()) if path.is_file() else run_process(args, mode, path))
    summary: dict = {"process_repeats": args.process_repeats, "modes": {}}
    for mode, results in runs.items():
        streams = sorted({r["stream"] for res in results if "error" not in res for r in res["streams"]},
                         key=STREAMS.index)
        summary["modes"][mode] = {
            "processes_ok": sum("error" not in r for r in results),
            "stage2_samples_per_s": [r["stage2"]["samples_per_s"] if r.get("stage2") else None for r in results],
            "stage2_samples_per_s_median": median_of(results, lambda r: (r.get("stage2") or {}).get("samples_per_s")),
            "stage2_mfu_step_median": median_of(results, lambda r: (r.get("stage2") or {}).get("mfu_step")),
            "samples_per_s_median": {s: median_of(results, lambda r, s=s: next(
                (x["samples_per_s"] for x in r["streams"] if x["stream"] == s and not x["error"]), None))
                for s in streams}}
    ours = summary["modes"]["ours"]
    for baseline in modes[1:]:
        theirs = summary["modes"][baseline]
        if ours["stage2_samples_per_s_median"] and theirs["stage2_samples_per_s_median"]:
            summary[f"speedup_vs_{baseline}"] = ours["stage2_samples_per_s_median"] / theirs["stage2_samples_per_s_median"]
        summary[f"speedup_per_stream_vs_{baseline}"] = {
            s: v / theirs["samples_per_s_median"][s] for s, v in ours["samples_per_s_median"].items()
            if v and theirs["samples_per_s_median"].get(s)}
    table = format_table({f"{mode} #{i}": r for mode, results in runs.items() for i, r in enumerate(results)})
    (out_dir / "bench_train_step.json").write_text(json.dumps({**summary, "runs": runs}, indent=1))
    (out_dir / "bench_train_step.md").write_text(table + "\n")
    print(table)
    print(json.dumps(summary))
    return {**summary, "runs": runs}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", action="store_true", help="run both modes (one process each) and compare")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny preset, both modes, few steps")
    parser.add_argument("--mode", choices=MODES, default="ours")
    parser.add_argument("--modes", default="ours,upstream-1engine", help="--compare: modes to run, in order")
    parser.add_argument("--hang-dump", type=int, default=0,
                        help="print every thread's stack after this many seconds (diagnoses a stuck run)")
    parser.add_argument("--preset", default="13b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--streams", default="grounding,referring,vqa")
    parser.add_argument("--micro-batch", type=int, default=6)
    parser.add_argument("--gas", type=int, default=3, help="micro-steps per accumulation cycle")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds, each one accumulation cycle of every stream in turn (after a warm-up round)")
    parser.add_argument("--distinct-batches", type=int, default=0,
                        help="batches per stream, reused in turn (0: one per micro-step, none seen twice)")
    parser.add_argument("--process-repeats", type=int, default=2, help="--compare: processes per mode, alternating")
    parser.add_argument("--graph-query-chunk", type=int, default=2,
                        help="grounding graphs: queries per chunk (each chunk runs forward and backward at once)")
    parser.add_argument("--graph-query-multiple", type=int, default=2,
                        help="grounding graphs: pad the last chunk's query count to a multiple of this")
    parser.add_argument("--llm-only-reps", type=int, default=3)
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--peak-reps", type=int, default=20)
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="share of GPU memory the checkpointing plan may fill")
    parser.add_argument("--mode-timeout", type=int, default=0, help="--compare: seconds per mode (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write this mode's result here")
    parser.add_argument("--out", default="outputs/bench_train", help="--compare: folder of the results")
    args = parser.parse_args(argv)
    if args.tiny:
        args.compare, args.preset, args.device, args.modes = True, "tiny", "cpu", "ours,upstream"
        args.streams, args.micro_batch, args.gas, args.repeats, args.process_repeats = "grounding,referring", 2, 2, 2, 1
        args.llm_only_reps, args.peak_size, args.peak_reps = 1, 256, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.compare:
        summary = compare(args)
        failed = [m for m, results in summary["runs"].items() if any("error" in r for r in results)]
        return 1 if failed else 0
    result = run_mode(args)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(format_table({args.mode: result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
