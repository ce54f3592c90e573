"""The client optimizer and the learning-rate schedule (warmup, then constant / linear / cosine)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from trainer.config import TrainConfig


def lr_lambda(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_lengths(config: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) of the run."""
    s = config.schedule
    total = s.max_steps or max(1, math.ceil(s.epochs * steps_per_epoch))
    return total, s.warmup_steps or int(s.warmup_ratio * total)


def client_optimizer(config: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` from ``optim.*`` (used unless the DeepSpeed JSON names its own optimizer;
    on CPU DeepSpeed's own Adam would JIT-compile for ~50 s)."""
    o = config.optim
    return torch.optim.AdamW(
        list(params), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )


def scheduler_factory(config: TrainConfig, total_steps: int, warmup_steps: int) -> Any:
    """A callable optimizer -> LambdaLR, as ``deepspeed.initialize(lr_scheduler=...)`` takes it."""
    s = config.schedule

    def make(optimizer: Any) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, total_steps, warmup_steps, s.lr_scheduler, s.min_lr_ratio)
        )

    return make
