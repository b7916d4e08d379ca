"""Batched inference for the evaluation runners: prompts -> tensors -> ``model.generate`` -> JSONL.

Three layers, each usable alone:

* `RequestEncoder` / `collate_requests`: a `GenerationRequest` (image, messages, region boxes) becomes
  right-padded tensors in the batch contract's layout (BOS first, ``<image>`` expanded, ``<bbox>``
  boxes mapped to the CLIP input, a DINO image for the boxes of any ``[VG]``).
* `generate_for_requests`: one batched ``model.generate`` (KV cache) for a list of requests.
* `run_items`: the driver. Items are cut into fixed batches in item order; with torchrun, rank r runs
  batches r, r + world, ... (whole batches, so every batch is the same as in a one-process run and
  the results are identical, not merely equal up to padding numerics). Each rank appends one JSON line
  per finished item to its own file and flushes it; a restart skips the ids already written (a
  truncated last line from a killed run is dropped). Rank 0 then merges everything into one file in
  item order, the same file a single process writes.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from chatterbox.conversation import USER, Message
from chatterbox.data.errors import DataError, parse_sample_id
from chatterbox.data.processor import ClipInput, Processor
from chatterbox.data.transforms import ImageShapeError, load_image
from chatterbox.distributed import DTYPES, DistContext, join_torchrun, resolve_device, resolve_dtype
from chatterbox.tokens import NUM_IMAGE_PATCHES

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_IMAGE_PREFIX", "GenerationRequest", "EncodedRequest", "RequestEncoder", "collate_requests",
    "generate_for_requests", "upstream_answer_text", "DistContext", "join_torchrun",
    "read_jsonl", "run_items", "shard_path", "RunStats", "run_fingerprint", "fingerprint_path",
]

#: upstream's evaluation message: "<image>" + " " + prompt (eval_grounding.py / refcocog_referring_test.py).
EVAL_IMAGE_PREFIX = "<image> "


@dataclass
class GenerationRequest:
    """One prompt: a dialogue about one image that ends with a user message."""

    request_id: str  # "<file>#<record>" style: names the item in errors
    image_path: str
    messages: list[Message]  # user/assistant alternating, ending with the user turn to answer
    region_boxes_xyxy_abs: list = field(default_factory=list)  # one per <bbox> in all messages, in order
    clip_resize: str = "crop"
    image_size: tuple[int, int] | None = None  # (width, height) from the annotation, checked against the file

    @classmethod
    def single_turn(cls, request_id: str, image_path: str, user_text: str, region_boxes_xyxy_abs=(),
                    image_size=None, image_prefix: str = EVAL_IMAGE_PREFIX) -> "GenerationRequest":
        return cls(request_id, image_path, [Message(USER, image_prefix + user_text)], list(region_boxes_xyxy_abs),
                   image_size=image_size)


@dataclass
class PreparedImage:
    clip: ClipInput
    image_dino: torch.Tensor


@dataclass
class EncodedRequest:
    request_id: str
    input_ids: torch.Tensor  # [T]
    image_clip: torch.Tensor
    image_dino: torch.Tensor
    region_boxes_xyxy_clip_norm: torch.Tensor  # [n, 4]
    image_size_hw: tuple[int, int]


class RequestEncoder:
    """Tokenises prompts and prepares images exactly as the training data path does (data/transforms)."""

    def __init__(self, tokenizer, clip_image_size: int = 224, dino_image_size: int = 512,
                 region_box_normalisation: str = "crop", max_length: int = 2048,
                 num_image_patches: int = NUM_IMAGE_PATCHES, clip_resize: str = "per_source"):
        self.processor = Processor(tokenizer, clip_image_size, dino_image_size, region_box_normalisation,
                                   num_image_patches, clip_resize)
        self.tokenizer = tokenizer
        self.ids = self.processor.ids
        self.max_length = max_length

    @classmethod
    def from_config(cls, tokenizer, cfg) -> "RequestEncoder":
        """``cfg``: the project config (data sizes + model_max_length)."""
        return cls(tokenizer, cfg.data.clip_image_size, cfg.data.dino_image_size, cfg.data.region_box_normalisation,
                   min(cfg.data.max_length, cfg.model.language.model_max_length), cfg.data.num_image_patches,
                   cfg.data.clip_resize)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return self.processor.prompt_ids(request.messages)

    def prepare_image(self, request: GenerationRequest) -> PreparedImage:
        """Read ``request``'s image and make both branches' inputs: the part of `encode` that touches no
        tokenizer, so it may run in another thread while the model works on an earlier batch."""
        file, record = parse_sample_id(request.request_id)
        image = load_image(request.image_path, request.request_id, request.image_size)
        try:
            clip = self.processor.clip_input(image, request.clip_resize)
        except ImageShapeError as e:
            raise DataError(f"{request.image_path}: {e}", file or request.request_id, record or None, "image") from None
        return PreparedImage(clip, self.processor.dino_input(image))

    def encode(self, request: GenerationRequest, image: PreparedImage | None = None) -> EncodedRequest:
        """The model inputs of ``request``; ``image``: its `prepare_image`, if made already."""
        file, record = parse_sample_id(request.request_id)
        file, record = file or request.request_id, record or None
        input_ids = torch.tensor(self.prompt_ids(request), dtype=torch.long)
        n_bbox = int((input_ids == self.ids.bbox).sum())
        if n_bbox != len(request.region_boxes_xyxy_abs):
            raise DataError(f"prompt has {n_bbox} <bbox> tokens but {len(request.region_boxes_xyxy_abs)} region "
                            f"boxes", file, record, "region boxes")
        if len(input_ids) > self.max_length:
            raise DataError(f"prompt is {len(input_ids)} tokens, more than max_length={self.max_length}", file,
                            record, "prompt")
        # The DINO image is always prepared: the model may also generate a [VG] in its reply.
        image = image if image is not None else self.prepare_image(request)
        regions = self.processor.region_boxes(request.region_boxes_xyxy_abs, image.clip, request.request_id)
        return EncodedRequest(request.request_id, input_ids, image.clip.image_clip, image.image_dino, regions,
                              image.clip.size_hw)


class ImagePrefetcher:
    """Reads and prepares requests' images in worker threads (decoding and resizing release the GIL) ahead
    of their batch, so a runner's next images are ready when the model finishes the current batch."""

    def __init__(self, encoder: RequestEncoder, workers: int = min(4, os.cpu_count() or 1)):
        self.encoder = encoder
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="image-prefetch")
        for r in requests:
            self._pending[r.request_id] = self._pool.submit(self.encoder.prepare_image, r)

    def take(self, requests: Sequence[GenerationRequest]) -> list[PreparedImage | None]:
        """The prepared image of each request submitted earlier (its error raised here), else None."""
        futures = [self._pending.pop(r.request_id, None) for r in requests]
        return [f.result() if f is not None else None for f in futures]


def collate_requests(encoded: Sequence[EncodedRequest], pad_token_id: int) -> dict:
    """Right-padded prompts, one image per row (offset = [0, 1, ..., B])."""
    if not encoded:
        raise ValueError("cannot collate an empty batch")
    length = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for b, e in enumerate(encoded):
        input_ids[b, : len(e.input_ids)] = e.input_ids
        attention_mask[b, : len(e.input_ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "images_clip": torch.stack([e.image_clip for e in encoded]),
        "images_dino": torch.stack([e.image_dino for e in encoded]),
        "offset": torch.arange(len(encoded) + 1, dtype=torch.long),
        "image_sizes_hw": torch.tensor([e.image_size_hw for e in encoded], dtype=torch.long),
        "region_boxes_xyxy_clip_norm": [e.region_boxes_xyxy_clip_norm for e in encoded],
        "sample_ids": [e.request_id for e in encoded],
    }


def upstream_answer_text(tokenizer, prompt_ids: Sequence[int], generated_ids: Sequence[int]) -> str:
    """Upstream's answer: decode the sequence, keep the text after the last "ASSISTANT:" up to "</s>".

    Only the prompt's last tokens are decoded with the reply; they hold "ASSISTANT:", and decoding them
    together keeps the reply's leading space as upstream's text_output has it (" It is a red truck.").
    """
    text = tokenizer.decode(list(prompt_ids[-8:]) + list(generated_ids), skip_special_tokens=False)
    marker = "ASSISTANT:"
    if marker not in text:
        raise RuntimeError(f"decoded prompt tail has no {marker!r}: {text!r}")
    return text.rsplit(marker, 1)[1].split("</s>", 1)[0]


@torch.no_grad()
def generate_for_requests(model, encoder: RequestEncoder, requests: Sequence[GenerationRequest], *,
                          max_new_tokens: int, min_new_tokens: int = 0, box_threshold: float | None = None,
                          device=None, images: Sequence[PreparedImage | None] | None = None) -> list[dict]:
    """Generate for a batch; one dict per request: answer text (upstream's cut), token ids, boxes.
    ``images``: the requests' `RequestEncoder.prepare_image`, where made already (None: made here).

    ``boxes_xyxy_abs`` / ``scores`` have one row per ``[VG]`` (prompt ones first, then generated ones);
    ``vg_in_prompt`` says how many answer the prompt.
    """
    encoded = [encoder.encode(r, image) for r, image in zip(requests, images or [None] * len(requests))]
    batch = collate_requests(encoded, encoder.ids.pad)
    device = device if device is not None else next(model.parameters()).device
    tensors = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    tensors["region_boxes_xyxy_clip_norm"] = [b.to(device) for b in batch["region_boxes_xyxy_clip_norm"]]
    results = model.generate(**tensors, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             box_threshold=box_threshold)
    out = []
    for e, r in zip(encoded, results):
        out.append({
            "text": upstream_answer_text(encoder.tokenizer, e.input_ids.tolist(), r.token_ids),
            "token_ids": list(r.token_ids),
            "boxes_xyxy_abs": r.boxes_xyxy_abs.tolist(),
            "scores": r.scores.tolist(),
            "vg_in_prompt": int(r.vg_in_prompt),
            "prompt_tokens": len(e.input_ids),
        })
    return out


# ----------------------------------------------------------------------------------------------
# Distributed set-up
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# JSONL predictions: incremental, resumable, sharded
# ----------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, *, repair: bool = False) -> list[dict]:
    """Records of a predictions file. A last line without its newline is what a killed writer leaves:
    it is ignored (``repair``: also cut from the file). Any other bad line is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if tail:
        logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", path, len(tail))
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(raw) - len(tail))
    records = []
    for n, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {n} is not valid JSON ({e.msg}); delete the file to start over", str(path), n,
                            "line") from None
        if not isinstance(record, dict) or "id" not in record:
            raise DataError(f"line {n} has no 'id'", str(path), n, "id")
        records.append(record)
    return records


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


def _partial_files(path: Path) -> list[Path]:
    """The merged file and every shard file a previous run (of any world size) may have left."""
    return ([path] if path.is_file() else []) + sorted(path.parent.glob(f"{path.stem}.rank*-of-*{path.suffix}"))


@dataclass
class RunStats:
    num_items: int = 0
    num_resumed: int = 0  # found in a partial file of an earlier run
    num_generated: int = 0  # by this process


def fingerprint_path(out_path: Path) -> Path:
    """The file beside a prediction file that says which run wrote it."""
    return out_path.with_name(out_path.name + ".run.json")


def check_or_write_fingerprint(out_path: Path, fingerprint: dict, dist: DistContext) -> None:
    """Predictions already in ``out_path`` (or its shards) are resumed only by the run that wrote them:
    same weights, settings and options (`run_fingerprint`); otherwise a DataError. A new file gets the
    fingerprint first."""
    sidecar = fingerprint_path(out_path)
    earlier = _partial_files(out_path)
    if earlier:
        if not sidecar.is_file():
            raise DataError("predictions of an unknown run are here (no fingerprint file beside them); delete "
                            "them or choose another --output-dir", str(earlier[0]), None, "run")
        saved = json.loads(sidecar.read_text())
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if changed:
            raise DataError(f"these predictions were written by another run (differs in {', '.join(changed)}: "
                            f"{saved.get(changed[0])!r} then, {fingerprint.get(changed[0])!r} now); delete them or "
                            f"choose another --output-dir", str(earlier[0]), None, changed[0])
    elif dist.is_main:
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        os.replace(tmp, sidecar)


def run_items(items: Sequence, item_id: Callable[[object], str], predict_batch: Callable[[list], list[dict]],
              out_path: str | Path, *, batch_size: int, dist: DistContext = DistContext(),
              log_every: int = 10, fingerprint: dict | None = None) -> tuple[list[dict] | None, RunStats]:
    """Run ``predict_batch`` over ``items`` with resume and sharding; return (records in item order, stats).

    ``predict_batch(list_of_items) -> list of JSON-able dicts`` (one per item, in order; the runner adds
    ``"id"``); if it has a ``prefetch(list_of_items)`` method, that is called with each batch one batch
    ahead, so it can read the next images while the model works. Records are written to ``out_path``
    (JSONL, one line per item, item order). Every rank returns the merged records after the final barrier. With a ``fingerprint`` (`run_fingerprint`), an
    earlier run's predictions are resumed only if that run had the same one.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = [item_id(it) for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"duplicate item id {dup!r}: ids must be unique to resume")
    if fingerprint is not None:
        check_or_write_fingerprint(out_path, fingerprint, dist)
    known = set(ids)
    done: dict[str, dict] = {}
    own = out_path if dist.world_size == 1 else shard_path(out_path, dist.rank, dist.world_size)
    for f in _partial_files(out_path):
        for rec in read_jsonl(f, repair=(f == own)):
            if rec["id"] not in known:
                raise DataError(f"id {rec['id']!r} is not in this question set (a file of another run?); "
                                f"delete it or choose another output", str(f), rec["id"], "id")
            done.setdefault(rec["id"], rec)
    dist.barrier()  # everyone has read the old files before anyone appends

    stats = RunStats(num_items=len(items), num_resumed=len(done))
    batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    mine = batches[dist.rank:: dist.world_size]
    todo_batches = [(n, todo) for n, batch in enumerate(mine) if (todo := [i for i in batch if ids[i] not in done])]
    # A predictor with a ``prefetch(items)`` method is told the next batch before it answers this one.
    prefetch = getattr(predict_batch, "prefetch", None)
    if prefetch is not None and todo_batches:
        prefetch([items[i] for i in todo_batches[0][1]])
    with open(own, "a") as f:
        for k, (n, todo) in enumerate(todo_batches):
            if prefetch is not None and k + 1 < len(todo_batches):
                prefetch([items[i] for i in todo_batches[k + 1][1]])
            records = predict_batch([items[i] for i in todo])
            if len(records) != len(todo):
                raise RuntimeError(f"predict_batch returned {len(records)} records for {len(todo)} items")
            for i, rec in zip(todo, records):
                rec = {"id": ids[i], **rec}
                f.write(json.dumps(rec, allow_nan=False) + "\n")
                done[ids[i]] = rec
            f.flush()
            os.fsync(f.fileno())
            stats.num_generated += len(todo)
            if log_every and (n + 1) % log_every == 0:
                logger.info("rank %d: %d/%d batches", dist.rank, n + 1, len(mine))
    dist.barrier()

    if dist.is_main:
        merged: dict[str, dict] = {}
        for f in _partial_files(out_path):
            for rec in read_jsonl(f):
                merged.setdefault(rec["id"], rec)
        missing = [i for i in ids if i not in merged]
        if missing:
            raise RuntimeError(f"{len(missing)} items have no prediction after the run (first: {missing[:3]})")
        tmp = out_path.with_name(out_path.name + ".tmp")
        with open(tmp, "w") as f:
            for i in ids:
                f.write(json.dumps(merged[i], allow_nan=False) + "\n")
        os.replace(tmp, out_path)
        for f in _partial_files(out_path):
            if f != out_path:
                f.unlink()
    dist.barrier()
    return [r for r in read_jsonl(out_path)], stats


# ----------------------------------------------------------------------------------------------
# Model + command-line set-up shared by evaluation/*.py
# ----------------------------------------------------------------------------------------------

def check_export_fits_config(export_model_cfg, cfg, checkpoint: str) -> None:
    """The questions are encoded with ``cfg``'s data settings, the export's model reads them: the data keys
    that repeat a model key (image sizes, CLIP patch grid and resize) must agree with the export (a tiny
    config with a small export gave silent garbage). Other model differences only mean the config is not
    the one the export was trained with: a warning."""
    from chatterbox.config import DATA_KEYS_FROM_MODEL, ConfigError, config_to_dict, model_value

    clash = []
    for key, path in DATA_KEYS_FROM_MODEL.items():
        exported, encoded = model_value(export_model_cfg, key), getattr(cfg.data, key)
        if exported != encoded:
            clash.append(f"model.{'.'.join(path)}: {exported!r} in the export, {encoded!r} in --config")
    if clash:
        raise ConfigError(f"--checkpoint {checkpoint} does not fit --config {cfg.name}: {'; '.join(clash)}; use "
                          f"the config the export was trained with")
    exported, configured = config_to_dict(export_model_cfg), config_to_dict(cfg)["model"]
    differ = []
    for part, values in exported.items():
        if isinstance(values, dict):
            differ += [f"model.{part}.{key}" for key, value in values.items() if configured[part].get(key) != value]
        elif values != configured[part]:
            differ.append(f"model.{part}")
    if differ:
        logger.warning("--checkpoint %s was built with other model settings than --config %s (%s); the export's "
                       "are used", checkpoint, cfg.name, ", ".join(differ[:8]) + (" ..." if len(differ) > 8 else ""))


def load_eval_model(cfg, checkpoint: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                    quantization: str = "none"):
    """``checkpoint``: a ``ChatterBox.save_pretrained`` directory or the Hub id of one; empty = the config's
    model (base weights from its paths; random parts drawn from ``seed``, so every rank builds the same model).
    ``quantization``: "8bit" / "4bit" puts the LLM's linear layers in bitsandbytes."""
    from chatterbox.model.chatterbox import ChatterBox

    if checkpoint:
        model = ChatterBox.from_pretrained(checkpoint, dtype=dtype, device=device, quantization=quantization)
        check_export_fits_config(model.cfg, cfg, checkpoint)
    else:
        torch.manual_seed(seed)
        model = ChatterBox.build(cfg.model, dtype=dtype, device=device, verbose=False, quantization=quantization)
    return model.eval()


#: runner options that change how predictions are scored, shown or batched, not what they are
NOT_IN_FINGERPRINT = {"output_dir", "limit", "batch_size", "device", "visualize", "no_meteor",
                      "no_caption_metrics", "bertscore", "clean", "bad_records", "iou_threshold"}


def run_fingerprint(args, cfg) -> dict:
    """What decides a run's predictions: the weights (the export folder, its files' sizes and times; or the
    config's model and seed), the data and eval settings, the dtype and the runner's own options. Batch
    size, device and scoring options are left out (the results do not depend on them). An export given by
    Hub id is its snapshot folder in the Hub cache, which names the commit."""
    from chatterbox.config import config_to_dict
    from chatterbox.model import hub

    settings = config_to_dict(cfg)
    data = {k: v for k, v in settings["data"].items() if k != "num_workers"}
    evaluation = {k: v for k, v in settings["eval"].items() if k not in ("batch_size", "output_dir", "visualize")}
    fingerprint = {"config": {"data": data, "eval": evaluation}}
    if args.checkpoint:
        folder = hub.resolve_folder(args.checkpoint, "--checkpoint", hub.EXPORT_FILES).resolve()
        fingerprint["checkpoint"] = str(folder)
        fingerprint["checkpoint_files"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                                           for p in sorted(folder.iterdir()) if p.is_file()}
    else:
        fingerprint["config"]["model"] = settings["model"]
        fingerprint["seed"] = args.seed
    options = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_FINGERPRINT
               and k not in ("config", "overrides", "checkpoint", "seed")}
    if options.get("quantization") == "none":
        del options["quantization"]  # full-precision runs resume the files written before the option existed
    return json.loads(json.dumps({**fingerprint, "options": options}, default=str))


def add_runner_arguments(parser) -> None:
    from chatterbox.config import add_config_arguments
    from chatterbox.model.quantization import add_quantization_argument

    add_config_arguments(parser)
    parser.add_argument("--checkpoint", default="", help="ChatterBox.save_pretrained directory or its Hub id "
                        "(owner/name[@revision]); empty = the config's model")
    parser.add_argument("--data", default="", help="dataset location (see the command's help); default from the config")
    parser.add_argument("--output-dir", default="", help="default: <eval.output_dir>/<benchmark>")
    parser.add_argument("--batch-size", type=int, default=0, help="default: eval.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="default: eval.max_new_tokens")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N items (0 = all)")
    parser.add_argument("--device", default="", help="default: the config's device (auto = cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed for randomly initialised parts (no checkpoint)")
    add_quantization_argument(parser)


@dataclass
class RunnerSetup:
    cfg: object
    model: object
    encoder: RequestEncoder
    dist: DistContext
    device: torch.device
    output_dir: Path
    batch_size: int
    max_new_tokens: int
    fingerprint: dict  # run_fingerprint: resume only what the same run wrote


def setup_runner(args, benchmark: str) -> RunnerSetup:
    """Config + overrides, distributed group, model on its device, encoder, output folder."""
    from chatterbox.config import config_from_args

    cfg = config_from_args(args)
    dist = join_torchrun(resolve_device(args.device or cfg.device))
    device = dist.device
    model = load_eval_model(cfg, args.checkpoint, device, resolve_dtype(args.dtype, device), args.seed,
                            args.quantization)
    encoder = RequestEncoder.from_config(model.tokenizer, cfg)
    output_dir = Path(args.output_dir or os.path.join(cfg.eval.output_dir, benchmark))
    output_dir.mkdir(parents=True, exist_ok=True)
    return RunnerSetup(cfg, model, encoder, dist, device, output_dir, args.batch_size or cfg.eval.batch_size,
                       args.max_new_tokens or cfg.eval.max_new_tokens, run_fingerprint(args, cfg))
