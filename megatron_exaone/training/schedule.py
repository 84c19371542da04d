"""Learning-rate schedules as multipliers of the peak LR: warmup-stable-decay (WSD), cosine, constant."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str = "wsd", decay_fraction: float = 0.2,
                  min_ratio: float = 0.1) -> float:
    """Multiplier at optimizer step `step` (0-based).

    wsd: linear warmup, constant, then a linear decay to `min_ratio` over the last `decay_fraction` of the steps.
    cosine: linear warmup, then cosine to `min_ratio`. constant: linear warmup, then 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_steps = max(1, int(round(total_steps * decay_fraction)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {kind!r}: use 'wsd', 'cosine' or 'constant'.")
