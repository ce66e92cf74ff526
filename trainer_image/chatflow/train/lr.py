"""Learning rate: linear warmup to the peak, then cosine decay to `minLr` at the run's last step."""

from __future__ import annotations

import math

from chatflow.spec import OptimizerSpec


def lr_at(step: int, optimizer: OptimizerSpec, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < optimizer.warmup_steps:
        return optimizer.lr * (step + 1) / optimizer.warmup_steps
    decay_steps = max(total_steps - optimizer.warmup_steps, 1)
    progress = min((step - optimizer.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optimizer.min_lr + (optimizer.lr - optimizer.min_lr) * cosine
