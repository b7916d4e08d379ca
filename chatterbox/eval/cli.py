"""Command-line plumbing shared by the benchmark runners in evaluation/*.py.

Each runner is a thin entry point: its own flags and question set, then these pieces, so every
runner has the same common flags, the same run (limit, predictor, resumable JSONL), the same
upstream-style JSON files, the same last-line metrics JSON and the same exit codes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from chatterbox.config import ConfigError
from chatterbox.data.errors import DataError
from chatterbox.eval.benchmarks import SingleRoundPredictor, grounding_prediction_entries, read_grounding_file
from chatterbox.eval.grounding_metrics import evaluate_grounding, evaluate_query_swap
from chatterbox.eval.runner import RunnerSetup, RunStats, add_runner_arguments, run_items
from chatterbox.model.weights import WeightsError

__all__ = ["runner_parser", "add_grounding_arguments", "add_caption_metric_arguments", "caption_scorer",
           "add_visualize_argument", "resolve_box_threshold", "run_single_round", "score_grounding_run", "run_fields",
           "write_upstream_json", "write_visualizations", "print_outcome", "entry_point"]

#: where --visualize writes its PNGs, under the run's output folder
VISUALIZATION_DIR = "visualizations"


def runner_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the script's docstring as help and the flags every runner has (config, model, output)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_arguments(parser)
    return parser


def add_grounding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--iou-threshold`` (success) and ``--box-threshold`` (DINO score cut; default from the config)."""
    parser.add_argument("--iou-threshold", type=float, default=0.5)
    parser.add_argument("--box-threshold", type=float, default=None, help="default: model.vision.box_threshold")


def add_query_swap_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query-swap", action="store_true",
                        help="also score each question with the [VG] query of another question about the same "
                             "image (success_rate_query_swapped): a model that grounds the words drops here")


def query_swap_fields(records, iou_threshold: float) -> dict:
    """The metrics-JSON fields of the query-swap control (grounding_metrics.evaluate_query_swap)."""
    control = evaluate_query_swap(records, iou_threshold=iou_threshold)
    return {"success_rate_query_swapped": control["success_rate_query_swapped"],
            "success_rate_swappable": control["success_rate"], "num_query_swappable": control["num_swappable"]}


def add_caption_metric_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (no Java start-up)")
    parser.add_argument("--no-caption-metrics", action="store_true",
                        help="skip BLEU/METEOR/ROUGE-L/CIDEr, which need pycocoevalcap and a Java runtime; the "
                             "predictions are written as always and can be scored later")


def caption_scorer(args: argparse.Namespace):
    """The context manager the runners score captions in: a CaptionScorer, or None with --no-caption-metrics."""
    if args.no_caption_metrics:
        return contextlib.nullcontext(None)
    from chatterbox.eval.caption_metrics import CaptionScorer

    return CaptionScorer(with_meteor=not args.no_meteor)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value


def add_visualize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--visualize", type=_count, default=0, metavar="N",
                        help=f"draw the first N grounding predictions (GT green, prediction red) as PNGs "
                             f"under <output-dir>/{VISUALIZATION_DIR}")


def resolve_box_threshold(args: argparse.Namespace, cfg) -> float:
    return args.box_threshold if args.box_threshold is not None else cfg.model.vision.box_threshold


def run_single_round(setup: RunnerSetup, items: Sequence, *, limit: int,
                     box_threshold: float | None) -> tuple[list, list[dict] | None, RunStats]:
    """One generation per item (the first ``limit`` items; 0 = all) into <output_dir>/predictions.jsonl,
    resumable and sharded; returns (the items run, their records in item order, stats)."""
    if limit:
        items = items[:limit]
    predict = SingleRoundPredictor(setup.model, setup.encoder, max_new_tokens=setup.max_new_tokens,
                                   box_threshold=box_threshold)
    records, stats = run_items(items, lambda it: it.item_id, predict, setup.output_dir / "predictions.jsonl",
                               batch_size=setup.batch_size, dist=setup.dist, fingerprint=setup.fingerprint)
    return items, records, stats


def score_grounding_run(setup: RunnerSetup, items: Sequence, records: Sequence[dict], iou_threshold: float,
                        group_field: str | None = None):
    """Write <output_dir>/prediction.json in upstream's layout and score that file as eval_grounding.py
    would; returns (number of entries, the predictions read back, their evaluation)."""
    entries = grounding_prediction_entries(items, records, group_field=group_field)
    path = setup.output_dir / "prediction.json"
    write_upstream_json(path, entries)
    predictions = read_grounding_file(path, group_field=group_field)
    return len(entries), predictions, evaluate_grounding(predictions, iou_threshold=iou_threshold)


def run_fields(args: argparse.Namespace, stats: RunStats) -> dict:
    """The summary.json fields every runner records about its run."""
    return {"checkpoint": args.checkpoint or "(config model)", "num_resumed": stats.num_resumed}


def write_upstream_json(path: str | Path, obj) -> None:
    """A file in upstream's layout (prediction.json, raw_output, question sets), indented as upstream's."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def write_visualizations(records: Sequence, ious: Sequence[float], output_dir: str | Path,
                         num_images: int) -> list[Path]:
    """PNGs of the first ``num_images`` grounding records (`GroundingRecord`) whose image exists, under
    <output_dir>/visualizations; returns the files written (nothing for ``num_images`` 0)."""
    if num_images <= 0:
        return []
    from chatterbox.eval.reports import visualize_grounding

    folder = Path(output_dir) / VISUALIZATION_DIR
    vis = visualize_grounding(records, ious, folder, num_images=num_images)
    print(f"visualisations: {len(vis.written)} written to {folder}, {len(vis.skipped)} skipped (image not found)")
    return vis.written


def print_outcome(path: str | Path, count: int, stats: RunStats, result: dict, unit: str = "entries") -> None:
    """What was written, then the metrics JSON as the last line (the runners' output contract)."""
    print(f"wrote {path} ({count} {unit}, {stats.num_resumed} resumed)")
    print(json.dumps(result))


def entry_point(main: Callable[[], int]) -> None:
    """Run ``main`` as a command: bad data or a missing file is one ``error:`` line and exit status 1."""
    try:
        sys.exit(main())
    except (DataError, FileNotFoundError, ConfigError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
