"""Upstream's learning-rate schedule (DeepSpeed WarmupDecayLR with linear warm-up), spec/upstream.md §2.4.

    f(s) = min_lr + (max_lr - min_lr) * s / warmup                    for s < warmup
    f(s) = min_lr + (max_lr - min_lr) * max(0, (T - s) / (T - warmup)) otherwise

where s counts scheduler steps and T = epochs * steps_per_epoch. We step the schedule once per optimizer
step, so optimizer step k runs at f(k). Upstream additionally stepped it by hand once per global step
(every global step but the first), which makes the LR reach 0 about halfway through the nominal run;
``UpstreamDoubleStepping`` reproduces that on request.
"""
from __future__ import annotations

import torch


def warmup_decay_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float = 0.0) -> float:
    """The closed form f(step) above."""
    if step < warmup_steps:
        gamma = step / warmup_steps
    else:
        gamma = max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))
    return min_lr + (max_lr - min_lr) * gamma


class WarmupDecaySchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose factor makes every param group follow `warmup_decay_lr`, scaled by the group's
    ``lr_scale`` (1 when absent)."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float = 0.0):
        if total_steps <= 0 or warmup_steps < 0:
            raise ValueError(f"total_steps={total_steps} must be > 0 and warmup_steps={warmup_steps} >= 0")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.max_lr, self.min_lr = max_lr, min_lr
        for group in optimizer.param_groups:
            group["lr"] = max_lr * group.get("lr_scale", 1.0)
            group.pop("initial_lr", None)
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return warmup_decay_lr(step, self.total_steps, self.warmup_steps, self.max_lr, self.min_lr) / self.max_lr


def upstream_extra_steps(global_step: int) -> int:
    """Manual scheduler steps upstream adds after global step ``global_step`` (0-based): one, except the first."""
    return 0 if global_step == 0 else 1
