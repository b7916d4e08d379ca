#!/usr/bin/env python
"""The main job on the tiny preset (CPU): synthetic data -> stage 1 -> stage 2 -> evaluation.

    python scripts/quickstart.py                                   # tiny preset, CPU (scripts/quickstart.sh)
    python scripts/quickstart.py --preset small --num-images 12000 # small preset, one GPU (scripts/gpu_proof_run.sh)

Every step is the command a user would run; this script only chains them and summarises. The last
printed line is a JSON object with the grounding metrics of the trained and the untrained model (with
the query-swap control), the referring metrics (with the name accuracy), the multi-round accuracy (with
its target-swap control), where the checkpoint and the picture of predicted boxes are, and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def shared_word_fields(by_shared_word: list[dict]) -> dict:
    """Summary fields from coco_grounding's success_rate_by_shared_word on the synthetic "<colour> <kind>" names."""
    fields = {}
    for shared in by_shared_word:
        decides = {0: "kind", 1: "colour"}[shared["word"]]
        fields[f"grounding_success_rate_{decides}_decides"] = shared["success_rate"]
        fields[f"grounding_success_rate_{decides}_decides_chance"] = shared["chance"]
    return fields


def set_arguments(overrides: list[str]) -> list[str]:
    """``--set KEY=VALUE`` command-line arguments for every override."""
    return [arg for override in overrides for arg in ("--set", override)]


def run(cmd: list[str], log: Path) -> str:
    """Run a step, keep its full output in ``log``, return its last line (the JSON a command prints)."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        print("\n".join(lines[-40:]), file=sys.stderr)
        raise SystemExit(f"step failed (exit {proc.returncode}); full log: {log}")
    print(f"  done in {time.perf_counter() - start:.1f}s (log: {shown(log)})", flush=True)
    return lines[-1] if lines else ""


def contact_sheet(images: list[Path], out: Path, columns: int = 3, cell: int = 256) -> Path:
    from PIL import Image

    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, max(rows, 1) * cell), "white")
    for i, path in enumerate(images):
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((cell, cell))
            sheet.paste(img, ((i % columns) * cell, (i // columns) * cell))
    sheet.save(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny",
                        help="configs <preset>_stage1 and <preset>_stage2 (tiny: CPU; small: one GPU)")
    parser.add_argument("--work-dir", default=None, help="where logs, metrics and pictures go "
                        "(default outputs/quickstart, or outputs/quickstart_<preset>)")
    parser.add_argument("--num-images", type=int, default=1200, help="synthetic scenes to write")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="share of scenes held out for evaluation")
    parser.add_argument("--gpus", type=int, default=None, help="passed to the training launchers")
    parser.add_argument("--stage1-steps", type=int, default=None, help="override the stage-1 config's steps")
    parser.add_argument("--stage2-steps", type=int, default=None, help="override the stage-2 config's steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field in both stages and every evaluation (repeatable)")
    parser.add_argument("--stage1-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of stage 1's training only (repeatable)")
    parser.add_argument("--stage2-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of stage 2's training only (repeatable)")
    parser.add_argument("--eval-dtype", default="fp32", help="evaluation dtype (the presets train in fp32)")
    parser.add_argument("--no-caption-metrics", action="store_true",
                        help="skip BLEU/METEOR/CIDEr (they need pycocoevalcap and Java); the accuracies stay")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    default_work = "outputs/quickstart" if args.preset == "tiny" else f"outputs/quickstart_{args.preset}"
    work = REPO / (args.work_dir or default_work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from chatterbox.config import load_config
    from chatterbox.eval.benchmarks import colour_kind_accuracy_fields

    name1, name2 = f"{args.preset}_stage1", f"{args.preset}_stage2"
    both = list(args.overrides)
    length1 = [] if args.stage1_steps is None else [f"train.steps_per_epoch={args.stage1_steps}"]
    length2 = [] if args.stage2_steps is None else [f"train.steps_per_epoch={args.stage2_steps}"]
    steps1, steps2 = both + args.stage1_set + length1, both + args.stage2_set + length2
    stage1, stage2 = load_config(name1, steps1), load_config(name2, steps2)
    sets1, sets2, sets = set_arguments(steps1), set_arguments(steps2), set_arguments(both)
    data_dir = Path(stage1.data.paths.coco2017_dir).parent  # the corpus the configs read
    coco_dir = str(data_dir / "MSCOCO2017")
    gpus = [] if args.gpus is None else ["--gpus", str(args.gpus)]
    eval_options = ["--dtype", args.eval_dtype, *sets]
    captions = ["--no-caption-metrics"] if args.no_caption_metrics else []
    # 1200 scenes, 60 of them held out: enough variety that the model cannot memorise its way through
    # (the eval scenes are never trained on), few enough eval questions for a CPU.
    run([PY, "scripts/make_synthetic_data.py", "--out", str(data_dir), "--num-images", str(args.num_images),
         "--eval-fraction", str(args.eval_fraction)], work / "data.log")

    untrained = json.loads(run(
        [PY, "evaluation/coco_grounding.py", "--config", name1, "--seed", str(stage1.train.seed), *eval_options,
         "--data", coco_dir, "--output-dir", str(work / "eval_untrained")], work / "eval_untrained.log"))

    for cfg in (stage1, stage2):  # a fresh run each time (no resume from an older quickstart)
        shutil.rmtree(REPO / cfg.train.output_dir, ignore_errors=True)
        shutil.rmtree(REPO / cfg.train.log_dir / cfg.name, ignore_errors=True)
    run([PY, "startup_stage1.py", "--config", name1, *gpus, *sets1], work / "stage1.log")
    run([PY, "startup_stage2.py", "--config", name2, *gpus, *sets2], work / "stage2.log")
    checkpoint = Path(stage2.train.output_dir) / "export"

    grounding = json.loads(run(
        [PY, "evaluation/coco_grounding.py", "--config", name2, "--checkpoint", str(checkpoint), *eval_options,
         "--data", coco_dir, "--query-swap", "--output-dir", str(work / "eval_grounding")],
        work / "eval_grounding.log"))
    referring = json.loads(run(
        [PY, "evaluation/refcocog_referring.py", "--config", name2, "--checkpoint", str(checkpoint), *eval_options,
         *captions, "--split", "val", "--output-dir", str(work / "eval_referring")], work / "eval_referring.log"))
    multiround = json.loads(run(
        [PY, "evaluation/cb_mrg.py", "--config", name2, "--checkpoint", str(checkpoint), *eval_options, *captions,
         "--data", str(data_dir / "eval" / "CB_MRG_eval.json"), "--image-dir", str(data_dir / "VG"),
         "--output-dir", str(work / "eval_multiround")],
        work / "eval_multiround.log"))
    later = multiround["grounding"]["later_rounds"]
    for rnd, g in multiround["grounding"]["by_round"].items():
        print(f"  multi-round grounding, round {rnd}: success {g['success_rate']:.3f} ({g['num_success']}/"
              f"{g['num_samples']})")

    vis_dir = work / "eval_grounding" / "visualization"
    run([PY, "evaluation/eval_grounding.py", "--predictions", str(work / "eval_grounding" / "prediction.json"),
         "--out-dir", str(vis_dir), "--visualize", "9"], work / "visualize.log")
    picture = contact_sheet(sorted(vis_dir.rglob("*.png"))[:9], work / "predicted_boxes.png")

    summary = {
        "preset": args.preset,
        "grounding_success_rate": grounding["success_rate"],
        "grounding_miou": grounding["miou"],
        "grounding_miou_at_success": grounding["miou_at_success"],
        "untrained_grounding_success_rate": untrained["success_rate"],
        "untrained_grounding_miou": untrained["miou"],
        "grounding_num_samples": grounding["num_samples"],
        # the control: each question answered with another question's [VG] query (same image)
        "grounding_success_rate_query_swapped": grounding["success_rate_query_swapped"],
        # where another shape of the image has the same kind (colour), only the colour (kind) tells them
        # apart: the box follows that word if the rate is above the chance of picking among them
        **shared_word_fields(grounding["success_rate_by_shared_word"]),
        # the synthetic names are "<colour> <kind>": both words, then each on its own, beside their controls
        **colour_kind_accuracy_fields(referring),
        "referring_meteor": referring.get("METEOR"),
        "referring_cider": referring.get("CIDEr"),
        # "Where is it?" rounds after "What is <region>?": the answer needs the earlier round
        "multiround_accuracy": later["success_rate"],
        "multiround_accuracy_target_swapped": later["success_rate_target_swapped"],
        "checkpoint": str(checkpoint),
        "picture": shown(picture),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"\ntrained export: {checkpoint}\npredicted boxes (green = truth, red = prediction): {summary['picture']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
