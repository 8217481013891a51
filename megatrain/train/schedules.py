"""LR schedules as multipliers of the peak LR (for torch's LambdaLR), each with linear warmup.

Closed forms, with s = step - warmup after warmup (steps counted from 0):
  constant:    1
  step:        gamma ** floor(s / step_size)
  exponential: gamma ** s
  cosine:      min_ratio + (1 - min_ratio) * (1 + cos(pi * s / (max_steps - warmup))) / 2
Warmup: (step + 1) / warmup for step < warmup, so the first step already moves.
"""
from __future__ import annotations

import math
from typing import Callable

from megatrain.config.schema import TrainConfig


def lr_multiplier(train: TrainConfig) -> Callable[[int], float]:
    warmup, total = train.warmup_steps, train.max_steps
    min_ratio = train.min_lr / train.lr

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        s = step - warmup
        if train.schedule == "constant":
            return 1.0
        if train.schedule == "step":
            return train.gamma ** (s // train.step_size)
        if train.schedule == "exponential":
            return train.gamma ** s
        decay = max(total - warmup, 1)
        progress = min(s / decay, 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
