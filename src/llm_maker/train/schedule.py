"""Learning-rate schedule: linear warmup, then cosine decay to a floor (10% of the peak, as the
LLM Maker design doc's runs and l20-edu-135m do)."""
from __future__ import annotations

import math


def cosine_lr(step: int, peak_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR for optimizer step `step` (0-based). Warmup reaches the peak at step warmup_steps - 1."""
    min_lr = peak_lr * min_lr_ratio
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps - 1))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
