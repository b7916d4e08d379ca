"""The project-wide typed config: model, data, training, evaluation and chat.

One schema drives training, evaluation and chat. Files live in configs/ (`tiny`, `7b`, `13b` x stage
1/2); any field can be overridden on a command line with ``--set a.b=c``. Defaults are upstream's recipe
for the 13B model (spec/upstream.md §2).

    cfg = load_config("configs/13b_stage1.yaml", ["train.lr=1e-5"])
    dump_config(cfg, "resolved.yaml"); assert load_config("resolved.yaml") == cfg
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from chatterbox import config_schema
from chatterbox.config_schema import ConfigError
from chatterbox.data.config import DataConfig, DatasetPaths
from chatterbox.model.config import (PARAMETER_GROUPS, ClipConfig, LanguageConfig, ModelConfig, QueryHeadConfig,
                                     RegionEncoderConfig)

__all__ = [
    "ChatterBoxConfig", "ModelConfig", "LanguageConfig", "ClipConfig", "RegionEncoderConfig",
    "QueryHeadConfig", "DataConfig", "DatasetPaths", "TrainConfig", "StreamConfig", "EvalConfig",
    "ChatConfig", "ConfigError", "load_config", "dump_config", "config_to_dict", "add_config_arguments",
    "config_from_args", "REPO_ROOT", "CONFIG_DIR",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


@dataclass
class StreamConfig:
    """One data stream of a stage: micro-batch, accumulation and how often it runs (every N global steps)."""

    micro_batch_size: int = 6
    gradient_accumulation_steps: int = 20
    every_n_steps: int = 1


@dataclass
class TrainConfig:
    stage: Literal[1, 2] = 1
    output_dir: str = "outputs/13b_stage1"
    # Full-model initialisation: stage 2 starts from stage 1's output (a directory or checkpoint file).
    init_from: str = ""
    resume: str = ""  # "", "auto" (latest in output_dir) or a checkpoint directory
    # A fresh run (no resume) into an output_dir holding checkpoints is refused; True moves them aside instead.
    overwrite_checkpoints: bool = False
    seed: int = 42
    epochs: int = 5
    steps_per_epoch: int = 3000
    # Optimiser: AdamW as upstream's DeepSpeed config.
    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    # WarmupDecayLR: linear warm-up to lr over warmup_steps, then linear decay to 0 at the last step.
    warmup_steps: int = 50
    warmup_min_lr: float = 0.0
    # "once": the schedule advances once per optimizer step (correct). "upstream_double": reproduce
    # upstream's extra manual scheduler.step() per global step (spec §2.5), which ends the LR early.
    schedule_stepping: Literal["once", "upstream_double"] = "once"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # DeepSpeed ZeRO stage: 2 (upstream) partitions optimizer state and gradients; 3 also the parameters
    # (for cards smaller than upstream's 80 GB; no CUDA graphs or compiled layers then).
    zero_stage: int = 2
    # ZeRO-3: parameters of at most this many elements stay whole on every rank (DeepSpeed's default);
    # 0 partitions every one.
    zero3_persistence_threshold: int = 100_000
    # Host (CPU) offload: the optimizer's state and step (ZeRO 1-3), the parameters (ZeRO-3 only).
    offload_optimizer: bool = False
    offload_parameters: bool = False
    # On GPUs, replay the frozen image encoders (CLIP, Swin) from CUDA graphs: same outputs, fewer launches.
    cuda_graph_frozen_encoders: bool = True
    # On GPUs, replay the grounding step's trainable vision part (encoder, decoder, heads, loss; forward and
    # backward) from CUDA graphs (chatterbox.accel.use_grounding_loss_graphs); needs vision checkpointing off.
    cuda_graph_grounding_loss: bool = True
    # torch.compile blocks of the model (chatterbox.accel.compile_layers): "none", "language" (LLM decoder
    # layers) or "all" (also the vision branch's encoder, text and decoder layers). Needs a C/CUDA toolchain.
    compile_layers: Literal["none", "language", "all"] = "none"
    streams: dict[str, StreamConfig] = field(
        default_factory=lambda: {"grounding": StreamConfig(6, 20, 1)}
    )
    # Before a fresh stage (not a resume): this many steps of the query warm-up (chatterbox.train.query_warmup),
    # for a random language model on the synthetic corpus (the tiny preset); 0 = none, as upstream.
    query_warmup_steps: int = 0
    # its AdamW rate: at stage 1's 2e-3 it often learned one word and not the other; at 5e-4 both (query_warmup.py)
    query_warmup_lr: float = 5e-4
    # Learning-rate multiplier per parameter group (chatterbox.model.config.PARAMETER_GROUPS), applied to the
    # whole schedule; empty = one rate for everything, as upstream.
    lr_scale: dict[str, float] = field(default_factory=dict)
    save_every_steps: int = 50
    keep_last_checkpoints: int = 2
    log_dir: str = "runs"
    # Where each step's scalars go (chatterbox/train/tracking.py): "tensorboard" (event files in
    # log_dir/<name>) and/or "wandb" (a Weights & Biases run named <name>, its files in log_dir/wandb;
    # WANDB_MODE=offline keeps it on disk); [] logs nothing.
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "chatterbox"
    print_every_steps: int = 1


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_new_tokens: int = 512
    output_dir: str = "outputs/eval"
    # RefCOCOg referring: upstream's instruction suffix appended to "What is it <bbox>?".
    referring_suffix: str = "Please give a brief answer in one sentence less than 10 words."
    clean_referring_output: bool = False
    visualize: int = 0  # number of predictions drawn as PNG


@dataclass
class ChatConfig:
    max_new_tokens: int = 512
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    request_timeout_s: float = 30.0  # web demo: a connection silent this long is closed


@dataclass
class ChatterBoxConfig:
    name: str = "13b_stage1"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)


def _resolve_path(path: str | Path) -> Path:
    """A config file path, or a preset name under configs/ (``tiny_stage1`` -> configs/tiny_stage1.yaml)."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = CONFIG_DIR / f"{path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file {str(path)!r} and no preset of that name; presets: {known}")


#: numbers that may be zero or negative (inclusive bounds; None = unbounded); every other int must be >= 1
INT_RANGES = {
    "data.num_workers": (0, None), "data.max_skipped_records": (0, None), "data.min_caption_words": (0, None),
    "data.max_redraws": (0, None), "eval.visualize": (0, None), "train.warmup_steps": (0, None),
    "train.seed": (0, None), "train.zero_stage": (0, 3), "train.zero3_persistence_threshold": (0, None),
    "train.query_warmup_steps": (0, None),
    "chat.port": (0, 65535),
    "model.clip.image_feature_layer": (None, None), "model.clip.region_feature_layers": (None, None),
    "model.language.gradient_checkpointing_layers": (-1, None),
    "model.vision.return_interm_indices": (0, None),
}
#: floats that must be > 0 (every other float must be >= 0)
POSITIVE_FLOATS = {"train.lr", "train.query_warmup_lr", "train.eps", "chat.request_timeout_s",
                   "model.language.rms_norm_eps", "model.language.rope_theta", "model.vision.pe_temperature_h",
                   "model.vision.pe_temperature_w", "model.vision.swin_mlp_ratio"}
#: fractions and probabilities: floats in [0, 1]
UNIT_FLOATS = ("dropout", "drop_path", "droppath", "_prob", "box_threshold", "focal_alpha")


def _numbers(node, key: str = ""):
    """(dotted key, value) of every number in the config tree; list items under their list's key."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _numbers(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, dict):
        for name, value in node.items():
            yield from _numbers(value, f"{key}.{name}")
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _numbers(value, key)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, node


def check_ranges(cfg: ChatterBoxConfig) -> ChatterBoxConfig:
    """Every number in its range, checked at load: a bad value is one error naming its key, not a crash
    deep inside torch or DeepSpeed (or after the model is built)."""
    for key, value in _numbers(cfg):
        if isinstance(value, int):
            low, high = INT_RANGES.get(key, (1, None))
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ConfigError(f"{key}={value} must be {bounds}")
        elif not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
        elif key == "train.betas" and not 0 <= value < 1:
            raise ConfigError(f"train.betas={list(cfg.train.betas)}: each must be in [0, 1)")
        elif any(part in key.rsplit(".", 1)[-1] for part in UNIT_FLOATS) and not 0 <= value <= 1:
            raise ConfigError(f"{key}={value} must be between 0 and 1")
        elif (key in POSITIVE_FLOATS or key.startswith("train.lr_scale.")) and value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
        elif value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    return cfg


def check_consistency(cfg: ChatterBoxConfig) -> ChatterBoxConfig:
    """Cross-field rules: values the data pipeline and the model must agree on."""
    pairs = [(f"data.{key}", getattr(cfg.data, key), f"model.{'.'.join(path)}", model_value(cfg.model, key))
             for key, path in DATA_KEYS_FROM_MODEL.items()]
    pairs.append(("model.query_head.out_dim", cfg.model.query_head.out_dim,
                  "model.vision.hidden_dim", cfg.model.vision.hidden_dim))
    for key_a, a, key_b, b in pairs:
        if a != b:
            raise ConfigError(f"{key_a}={a} must equal {key_b}={b}")
    repeated = sorted({name for name in cfg.train.report_to if cfg.train.report_to.count(name) > 1})
    if repeated:
        raise ConfigError(f"train.report_to names {repeated[0]!r} more than once: {cfg.train.report_to}")
    unknown = sorted(set(cfg.train.lr_scale) - set(PARAMETER_GROUPS))
    if unknown:
        raise ConfigError(f"train.lr_scale.{unknown[0]}: no such parameter group; groups: {list(PARAMETER_GROUPS)}")
    language = cfg.model.language
    if cfg.train.query_warmup_steps and (language.llm_path or language.freeze_base or cfg.model.clip.freeze):
        raise ConfigError("train.query_warmup_steps needs a random language model (model.language.llm_path empty) "
                          "that the stage trains with CLIP (model.language.freeze_base and model.clip.freeze false): "
                          "a resume restores only trained weights")
    if cfg.train.query_warmup_steps and "grounding" not in cfg.train.streams:
        raise ConfigError("train.query_warmup_steps needs a grounding stream in train.streams (it trains on its "
                          "batches)")
    if cfg.train.offload_parameters and cfg.train.zero_stage != 3:
        raise ConfigError(f"train.offload_parameters=true needs train.zero_stage=3 (got {cfg.train.zero_stage}): "
                          "only ZeRO-3 partitions the parameters")
    if cfg.train.offload_optimizer and cfg.train.zero_stage == 0:
        raise ConfigError("train.offload_optimizer=true needs train.zero_stage >= 1: ZeRO-0 keeps the whole "
                          "optimizer on each device")
    if cfg.data.max_length > cfg.model.language.model_max_length:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds "
                          f"model.language.model_max_length={cfg.model.language.model_max_length}")
    return cfg


#: data keys that repeat a model key (the data pipeline never reads the model config), with the model key:
#: unless a file or override sets them, they take the model's value; set to something else,
#: check_consistency refuses them (and an evaluation refuses an export whose model differs in them).
DATA_KEYS_FROM_MODEL = {
    "dino_image_size": ("vision", "image_size"),
    "clip_image_size": ("clip", "image_size"),
    "clip_patch_size": ("clip", "patch_size"),
    "clip_resize": ("clip", "resize"),
}


def model_value(model_cfg: ModelConfig, data_key: str):
    """The model's value of a data key in `DATA_KEYS_FROM_MODEL`."""
    part, name = DATA_KEYS_FROM_MODEL[data_key]
    return getattr(getattr(model_cfg, part), name)


def load_config(path: str | Path | None = None, overrides=()) -> ChatterBoxConfig:
    """Load a config file (or preset name) and apply ``key=value`` overrides; strict."""
    settings = config_schema.read_settings(ChatterBoxConfig, _resolve_path(path) if path is not None else None,
                                           overrides)
    cfg = config_schema.from_dict(ChatterBoxConfig, settings)
    for key in DATA_KEYS_FROM_MODEL:
        if key not in settings.get("data", {}):
            setattr(cfg.data, key, model_value(cfg.model, key))
    return check_consistency(check_ranges(cfg))


def config_to_dict(cfg: ChatterBoxConfig) -> dict:
    return config_schema.to_dict(cfg)


def dump_config(cfg: ChatterBoxConfig, path: str | Path | None = None) -> str:
    return config_schema.dump_yaml(cfg, path)


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, required=default is None,
                        help="config file or preset name (configs/<name>.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-5 (repeatable)")


def config_from_args(args: argparse.Namespace) -> ChatterBoxConfig:
    """The config a command line asks for; a bad one ends the program with one ``error:`` line."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
