"""Learning-rate schedules as multipliers of the base LR: cosine and warmup-stable-decay (WSD; Hu et al. 2024,
"MiniCPM"), both with linear warmup."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(schedule: str, steps: int, warmup: int, min_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> Callable[[int], float]:
    def warm(step: int) -> float | None:
        return (step + 1) / warmup if step < warmup else None

    def cosine(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        decay_start = steps - int(decay_fraction * steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, steps - decay_start)
        return 1 - (1 - min_ratio) * progress

    def constant(step: int) -> float:
        w = warm(step)
        return 1.0 if w is None else w

    return {"cosine": cosine, "wsd": wsd, "constant": constant}[schedule]


def set_lr(optimizer, multiplier: float) -> float:
    """Set every group's LR to its base LR times `multiplier` (works for any object with `param_groups`,
    so layer-wise and zeroth-order optimizers are scheduled the same way). Returns the first group's LR."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * multiplier
    return optimizer.param_groups[0]["lr"] if optimizer.param_groups else 0.0
