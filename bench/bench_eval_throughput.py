"""Evaluation throughput: the COCO grounding and RefCOCOg referring runners on one GPU, in questions/s.

    python bench/bench_eval_throughput.py --preset 13b --out outputs/bench_eval_13b.json      # H100/H200
    python bench/bench_eval_throughput.py --preset tiny --device cpu --questions 8 --batch-sizes 1 4 \\
        --repeats 1 --answer-tokens 4                                                         # smoke test

What is timed is the runners' own path: `run_items` (JSONL written as it goes) over
`SingleRoundPredictor` (`RequestEncoder` reads and preprocesses the images, in worker threads one batch
ahead, then one batched ``model.generate``), i.e. what ``evaluation/coco_grounding.py`` and
``evaluation/refcocog_referring.py`` run per batch, on questions built by the same readers from a synthetic
corpus with COCO-sized JPEGs. ``--serial-too`` also times each batch size with the images read in the
main thread when their batch comes (the predictor without its ``prefetch``), interleaved with the default.
Random weights in bf16 (seed 0) do not stop generating, so every reply is forced to ``--answer-tokens``
tokens (``min_new_tokens = max_new_tokens``); the default, 16, is the 90th percentile of upstream's
published RefCOCOg replies (12 words, 55 characters; at ~3.5 characters per LLaMA token). A grounding
score depends on the prompt alone (the box is read from the prompt's ``[VG]``), so grounding is also run
with 1-token replies: the fastest run that writes the same prediction.json.

Per (benchmark, reply length) and batch size: questions/s over ``--repeats`` interleaved runs (batch
sizes rotate their order every repeat; one warm-up batch per batch size first), median and min/max, the
GPU's utilisation (nvidia-smi, sampled every 100 ms while a run lasts) and the peak memory. A separate,
untimed pass at the largest batch size splits a batch's time into image reading + preprocessing (CPU),
the image encoder + projector + region features (``build_inputs_embeds``), the LLM prefill, the decode
loop and the vision branch (backbone + encoder-decoder + box choice), each bracketed by CUDA syncs.
``--full-split`` (3422, the COCO grounding split) turns the best rate into minutes for the whole split.
Results go to --out as JSON; docs/BENCHMARKS.md summarises them.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

COCO_GROUNDING_QUESTIONS = 3422  # upstream's grounding_qa.json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="13b", choices=("tiny", "7b", "13b"))
    parser.add_argument("--tokenizer", default="", help="LLaMA-2 tokenizer folder (default: the tiny tokenizer)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--questions", type=int, default=256, help="questions per benchmark and timed run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--benchmarks", nargs="+", default=["grounding", "grounding_box_only", "referring"],
                        choices=("grounding", "grounding_box_only", "referring"))
    parser.add_argument("--full-split", type=int, default=COCO_GROUNDING_QUESTIONS)
    parser.add_argument("--serial-too", action="store_true",
                        help="also time every batch size without reading the next batch's images ahead")
    parser.add_argument("--out", default="")
    return parser.parse_args(argv)


def question_sets(root: Path, count: int) -> dict[str, list]:
    """COCO grounding and RefCOCOg referring items from a synthetic corpus with COCO-sized images, cycled
    (with fresh ids) up to ``count`` each."""
    from bench_data import BENCH_IMAGE_SIZES

    from chatterbox.data.synthetic import write_corpus
    from chatterbox.eval import questions as Q
    from chatterbox.config import EvalConfig

    corpus = write_corpus(root, num_images=96, seed=0, eval_fraction=0.5, image_sizes=BENCH_IMAGE_SIZES)
    paths = corpus.data_paths()
    coco = Path(paths["coco2017_dir"])
    records = Q.coco_grounding_qa(str(coco / "annotations" / "instances_val2017.json"))
    grounding = Q.coco_grounding_items(records, str(coco / "val2017"), "instances_val2017.json")
    refcocog = Path(paths["refer_dir"]) / "refcocog"
    by_split = Q.referring_questions(str(refcocog / "refs(umd).p"), str(refcocog / "instances.json"))
    refs = [r for split in sorted(by_split) for r in by_split[split]]
    referring = Q.referring_items(refs, str(Path(paths["coco2014_dir"]) / "train2014"), EvalConfig.referring_suffix)

    def cycled(items):
        return [dataclasses.replace(items[i % len(items)], item_id=f"{items[i % len(items)].item_id}~{i}")
                for i in range(count)]

    return {"grounding": cycled(grounding), "referring": cycled(referring)}


class GpuUtilisation:
    """nvidia-smi's utilisation.gpu sampled every 100 ms between start() and stop() (None without it)."""

    def __init__(self, index: int):
        self.index, self.samples, self._proc, self._thread = index, [], None, None

    def start(self):
        self.samples = []
        try:
            self._proc = subprocess.Popen(["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                                           "--format=csv,noheader,nounits", "-lms", "100"],
                                          stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def stop(self) -> float | None:
        if self._proc is None:
            return None
        self._proc.terminate()
        self._thread.join(timeout=2)
        self._proc = None
        return statistics.mean(self.samples) if self.samples else None


def timed_run(predict, items, batch_size: int, out_dir: Path, tag: str, device: torch.device, gpu: GpuUtilisation):
    from chatterbox.eval.runner import run_items

    out = out_dir / f"{tag}_{batch_size}_{time.monotonic_ns()}.jsonl"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gpu.start()
    start = time.perf_counter()
    records, _ = run_items(items, lambda it: it.item_id, predict, out, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    utilisation = gpu.stop()
    generated = [r["num_generated_tokens"] for r in records]
    return {"seconds": seconds, "questions_per_s": len(items) / seconds, "gpu_utilisation_pct": utilisation,
            "generated_tokens_min_max": [min(generated), max(generated)]}


def time_split(model, encoder, predict, items, device: torch.device) -> dict[str, float]:
    """Seconds per part of one batch, every part bracketed by device syncs (an untimed, separate pass)."""
    import chatterbox.model.chatterbox as chatterbox_module

    totals: dict[str, float] = {}

    def bracket(name, fn):
        def run(*args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return result
        return run

    make_decoder = model.make_decoder

    def make_bracketed_decoder(*args, **kwargs):
        decoder = make_decoder(*args, **kwargs)
        decoder.prefill = bracket("llm_prefill", decoder.prefill)
        return decoder

    original_decode = chatterbox_module.decode
    patches = {"encode": (encoder, bracket("images_read_and_preprocessed_cpu", encoder.encode)),
               "build_inputs_embeds": (model, bracket("image_encoder_projector_regions", model.build_inputs_embeds)),
               "make_decoder": (model, make_bracketed_decoder),
               "_attach_boxes": (model, bracket("vision_branch_boxes", model._attach_boxes))}
    for name, (owner, fn) in patches.items():
        setattr(owner, name, fn)
    chatterbox_module.decode = bracket("llm_decode", original_decode)
    try:
        start = time.perf_counter()
        predict(items)
        totals["whole_batch"] = time.perf_counter() - start
    finally:
        chatterbox_module.decode = original_decode
        for name, (owner, _) in patches.items():
            delattr(owner, name)
    totals["other"] = totals["whole_batch"] - sum(v for k, v in totals.items() if k != "whole_batch")
    return totals


def main(argv=None) -> int:
    from bench_chat import build_model
    from results import machine_fields, write_json

    from chatterbox.config import load_config
    from chatterbox.eval.benchmarks import SingleRoundPredictor
    from chatterbox.eval.runner import RequestEncoder

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    sets = question_sets(work / "data", args.questions)
    start = time.perf_counter()
    model, cfg = build_model(argparse.Namespace(preset=args.preset, tokenizer=args.tokenizer), device, dtype)
    build_s = time.perf_counter() - start
    # The data sizes of the preset's stage-2 recipe, as the runners read them from the run's config.
    encoder = RequestEncoder.from_config(model.tokenizer, load_config(REPO_ROOT / f"configs/{args.preset}_stage2.yaml"))
    threshold = cfg.vision.box_threshold
    runs = {"grounding": ("grounding", args.answer_tokens, threshold),
            "grounding_box_only": ("grounding", 1, threshold),
            "referring": ("referring", args.answer_tokens, None)}
    gpu = GpuUtilisation(device.index or 0 if device.type == "cuda" else 0)
    results = {}
    for name in args.benchmarks:
        task, tokens, box_threshold = runs[name]
        predict = SingleRoundPredictor(model, encoder, max_new_tokens=tokens, min_new_tokens=tokens,
                                         box_threshold=box_threshold)
        items = sets[task]
        for b in args.batch_sizes:  # warm-up: kernels, allocator, the decode step's graphs per batch size
            predict(items[:b])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        variants = {"prefetch": predict}
        if args.serial_too:
            variants["serial"] = lambda batch, predict=predict: predict(batch)  # no prefetch attribute
        per_size = {(v, b): [] for v in variants for b in args.batch_sizes}
        for rep in range(args.repeats):
            shift = rep % len(args.batch_sizes)
            for b in args.batch_sizes[shift:] + args.batch_sizes[:shift]:
                for v, runner in variants.items():
                    run = timed_run(runner, items, b, work / "runs", f"{name}_{v}", device, gpu)
                    per_size[(v, b)].append(run)
                    print(f"{name} {v} batch {b:3d} repeat {rep}: {run['questions_per_s']:.2f} questions/s "
                          f"(GPU {run['gpu_utilisation_pct']}%)", flush=True)
        rows = []
        for (v, b), reps in per_size.items():
            rates = [r["questions_per_s"] for r in reps]
            utilisation = [r["gpu_utilisation_pct"] for r in reps if r["gpu_utilisation_pct"] is not None]
            rows.append({"images": v, "batch_size": b, "questions_per_s_median": statistics.median(rates),
                         "questions_per_s_min_max": [min(rates), max(rates)],
                         "gpu_utilisation_pct_median": statistics.median(utilisation) if utilisation else None,
                         "runs": reps})
        best = max((r for r in rows if r["images"] == "prefetch"), key=lambda r: r["questions_per_s_median"])
        split = time_split(model, encoder, predict, items[:max(args.batch_sizes)], device)
        results[name] = {
            "task": task, "answer_tokens": tokens, "questions": len(items), "by_batch_size": rows,
            "best_batch_size": best["batch_size"],
            "full_split_minutes_at_best": args.full_split / best["questions_per_s_median"] / 60,
            "gpu_memory_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "time_split_s_at_largest_batch": split}
        print(f"{name}: best batch {best['batch_size']} at {best['questions_per_s_median']:.2f} questions/s -> "
              f"{args.full_split} questions in {results[name]['full_split_minutes_at_best']:.1f} min; split at "
              f"batch {max(args.batch_sizes)}: " + ", ".join(f"{k} {v:.3f}s" for k, v in split.items()), flush=True)

    report = {
        **machine_fields(device), "preset": args.preset,
        "tokenizer": args.tokenizer or "tiny", "dtype": str(dtype).removeprefix("torch."),
        "decode_options": str(model.decode_options), "build_s": round(build_s, 1),
        "batch_sizes": args.batch_sizes, "repeats": args.repeats, "full_split": args.full_split,
        "benchmarks": results,
    }
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
