"""Low-memory inference benchmark: the LLM in bf16, 8-bit and 4-bit (``--quantization``) on one GPU.

    python bench/bench_quantized_inference.py --preset 13b --out outputs/bench_quantized_13b.json   # H100/H200
    python bench/bench_quantized_inference.py --preset tiny --device cpu --questions 4 --answer-tokens 4   # smoke

Random weights (seed 0; the memory and the time of a step do not depend on the values), built on the device
(fast), then moved to the host: each mode starts from a copy of those host weights and is placed as
``ChatterBox.from_pretrained(..., quantization=mode)`` places a loaded export, so the peak GPU memory is what
a user loading an export sees. Per mode: the GPU memory the placed model holds, the peak over placement and
the questions, decode tokens/s (answers forced to ``--answer-tokens`` tokens, since random weights do not
stop), and, for the quantised modes, how often the grounded box (IoU >= 0.5) and the first generated token
agree with bf16's on the same grounding questions (synthetic scenes, "Where is the <colour> <kind>? [VG]",
one chat session per question). Results go to --out as JSON; docs/chat.md summarises them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="13b", choices=("tiny", "7b", "13b"))
    parser.add_argument("--tokenizer", default="", help="LLaMA-2 tokenizer folder (default: the tiny tokenizer)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", nargs="+", default=["none", "8bit", "4bit"])
    parser.add_argument("--questions", type=int, default=24, help="grounding questions per mode")
    parser.add_argument("--answer-tokens", type=int, default=32, help="every answer is forced to this length")
    parser.add_argument("--out", default="", help="JSON results file")
    return parser.parse_args(argv)


def grounding_questions(count: int) -> list[tuple[str, str]]:
    """(image path, question) pairs from a small synthetic corpus written to a temporary folder."""
    from chatterbox.data.synthetic import write_corpus
    from chatterbox.eval import questions as Q

    root = Path(tempfile.mkdtemp(prefix="bench_quantized_")) / "data"
    write_corpus(root, num_images=max(8, count), seed=0, eval_fraction=0.5)
    records = Q.coco_grounding_qa(str(root / "MSCOCO2017" / "annotations" / "instances_val2017.json"))
    return [(str(root / "MSCOCO2017" / "val2017" / r["filename"]), r["question"]) for r in records[:count]]


def run_mode(master, mode: str, device: torch.device, questions, answer_tokens: int) -> dict:
    from chatterbox.model.quantization import quantize_language_model

    on_gpu = device.type == "cuda"
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = copy.deepcopy(master)
    quantize_language_model(model, mode, device)  # "none": only moves it, as from_pretrained does
    model.eval()
    place_s = time.perf_counter() - start
    held = torch.cuda.memory_allocated(device) if on_gpu else None
    answers, rates = [], []
    for image, question in questions:
        reply = model.chat_session(image).ask(f"{question} [VG]", max_new_tokens=answer_tokens,
                                              min_new_tokens=answer_tokens)
        answers.append({"box": reply.boxes_xyxy_abs[0].tolist(), "first_token": reply.text.split()[:1]})
        rates.append(reply.stats.decode_tokens_per_s)
    result = {"mode": mode, "place_s": round(place_s, 2), "decode_tokens_per_s_median": statistics.median(rates),
              "decode_tokens_per_s_min_max": [min(rates), max(rates)], "answers": answers}
    if on_gpu:
        result["gpu_memory_held_gib"] = held / 2**30
        result["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    return result


def main(argv=None) -> int:
    from bench_chat import build_model
    from results import machine_fields, write_json

    from chatterbox.eval.grounding_metrics import iou_per_item

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    model, _ = build_model(argparse.Namespace(preset=args.preset, tokenizer=args.tokenizer), device, dtype)
    master = model.cpu()
    del model
    build_s = time.perf_counter() - start
    questions = grounding_questions(args.questions)
    results = [run_mode(master, mode, device, questions, args.answer_tokens) for mode in args.modes]
    reference = next((r for r in results if r["mode"] == "none"), None)
    if reference is not None:
        for r in results:
            pairs = list(zip(r["answers"], reference["answers"]))
            ious = iou_per_item([a["box"] for a, _ in pairs], [b["box"] for _, b in pairs])
            r["box_agrees_with_bf16"] = float((ious >= 0.5).double().mean())
            r["first_token_agrees_with_bf16"] = sum(a["first_token"] == b["first_token"] for a, b in pairs) / len(pairs)
    import bitsandbytes

    report = {
        **machine_fields(device), "bitsandbytes": bitsandbytes.__version__,
        "preset": args.preset, "tokenizer": args.tokenizer or "tiny", "dtype": str(dtype).removeprefix("torch."),
        "questions": len(questions), "answer_tokens": args.answer_tokens, "build_s": round(build_s, 1),
        "modes": results,
    }
    for r in results:
        print(f"{r['mode']:>5}: decode {r['decode_tokens_per_s_median']:.1f} tok/s"
              + (f", held {r['gpu_memory_held_gib']:.2f} GiB, peak {r['gpu_memory_peak_gib']:.2f} GiB"
                 if "gpu_memory_held_gib" in r else "")
              + (f", box agrees with bf16 {r['box_agrees_with_bf16']:.2f}" if "box_agrees_with_bf16" in r else ""))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
