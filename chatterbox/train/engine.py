"""The DeepSpeed engine: ZeRO-2 (ZeRO-3 and host offload as switches), AdamW, upstream's warm-up/decay
schedule, one engine for every stream.

Upstream builds one engine per data stream around the same model (three optimizers in stage 2, spec §5
item 6); we build one and switch its gradient-accumulation length per stream.
"""
from __future__ import annotations

import torch

from chatterbox.config import StreamConfig, TrainConfig
from chatterbox.model.lora import parameter_group
from chatterbox.train.checkpoint import read_only_safe_checkpoint_files
from chatterbox.train.schedule import WarmupDecaySchedule


def deepspeed_config(train: TrainConfig, stream: StreamConfig, world_size: int) -> dict:
    """The DeepSpeed config dict of spec §2.4 (optimizer and scheduler are passed as objects)."""
    zero = {
        "stage": train.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }
    if train.zero_stage == 3:  # prefetch and live-parameter limits stay at DeepSpeed's defaults
        zero["stage3_param_persistence_threshold"] = train.zero3_persistence_threshold
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {
        "train_micro_batch_size_per_gpu": stream.micro_batch_size,
        "gradient_accumulation_steps": stream.gradient_accumulation_steps,
        "train_batch_size": stream.micro_batch_size * stream.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": train.precision == "bf16"},
    }
    if train.offload_optimizer:
        # the step runs torch's AdamW on the host partitions (DeepSpeedCPUAdam would need its C++ op built)
        cfg["zero_force_ds_cpu_optimizer"] = False
    if train.precision == "bf16":
        # Accumulate the micro-batch gradients (20 of them in upstream's recipe) in fp32, not bf16.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def total_optimizer_steps(train: TrainConfig) -> int:
    """Length T of the LR schedule.

    With the corrected stepping, T is the number of optimizer steps the run makes (stage 2 interleaves
    several streams). With upstream's double stepping, T is upstream's nominal epochs * steps_per_epoch.
    """
    global_steps = train.epochs * train.steps_per_epoch
    if train.schedule_stepping == "upstream_double":
        return global_steps
    return sum(-(-global_steps // s.every_n_steps) for s in train.streams.values())


def build_engine(model: torch.nn.Module, train: TrainConfig, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine that optimises its trainable parameters."""
    import deepspeed

    groups = optimizer_groups(model, train.lr_scale)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    on_gpu = groups[0]["params"][0].is_cuda
    optimizer = torch.optim.AdamW(
        groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay,
        fused=True if on_gpu and not train.offload_optimizer else None,  # offloaded: steps on the host
    )
    scheduler = WarmupDecaySchedule(
        optimizer, total_optimizer_steps(train), train.warmup_steps, train.lr, train.warmup_min_lr
    )
    first_stream = next(iter(train.streams.values()))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(train, first_stream, world_size),
    )
    read_only_safe_checkpoint_files(engine)
    return engine, optimizer, scheduler


def optimizer_groups(model: torch.nn.Module, lr_scale: dict[str, float]) -> list[dict]:
    """The trainable parameters as optimizer groups: one per distinct ``lr_scale`` multiplier (first the
    unscaled one), each with its ``lr_scale`` for the schedule."""
    by_scale: dict[float, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_scale.setdefault(float(lr_scale.get(parameter_group(name), 1.0)), []).append(param)
    order = sorted(by_scale, key=lambda scale: (scale != 1.0, scale))
    return [{"params": by_scale[scale], "lr_scale": scale} for scale in order]


def use_stream(engine, stream: StreamConfig, world_size: int) -> None:
    """Switch the engine's gradient accumulation to ``stream``'s (the micro-batch size is the loader's)."""
    if engine.gradient_accumulation_steps() != stream.gradient_accumulation_steps:
        engine.set_train_batch_size(
            engine.train_micro_batch_size_per_gpu() * stream.gradient_accumulation_steps * world_size
        )
