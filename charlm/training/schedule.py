"""The learning-rate schedule, a pure function of the step and of how much of the run is done."""

from __future__ import annotations

import math

from charlm.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int, fraction_done: float) -> float:
    """The schedule: linear warm-up, then constant, step decay, or cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_decay ** (step // cfg.decay_every)
    if cfg.schedule == "cosine":
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(fraction_done, 1.0)))
    return cfg.lr
