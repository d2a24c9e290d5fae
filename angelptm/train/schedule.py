"""The learning-rate schedule: linear warmup, then cosine, linear or constant decay to min_lr.

A pure function of the step, so resuming needs no scheduler state beyond the step itself.
"""

from __future__ import annotations

import math

from angelptm.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    if optim.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor
