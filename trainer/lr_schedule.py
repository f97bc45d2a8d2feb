"""Learning-rate schedules as multipliers of the peak rate, as in the DeepSeek-V3 report.

    warmup   linear from peak/warmup_steps up to the peak over `warmup_steps` optimizer steps
    constant the peak after warmup
    cosine   cosine from the peak down to min_lr over the remaining steps
    wsd      warmup-stable-decay: the peak until the last `decay_fraction` of the steps, then cosine to min_lr

The report trains at a constant peak after warmup and decays with a cosine at the end: `wsd`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from trainer.config import OptimConfig


def lr_multiplier(step: int, schedule: str, warmup: int, total: int, min_ratio: float, decay_fraction: float) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index `step`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        start = warmup
    elif schedule == "wsd":
        start = max(warmup, total - round(decay_fraction * total))
    else:
        raise ValueError(f"unknown LR schedule {schedule!r}")
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, total - start))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """A plain function for torch's LambdaLR. A function (not an object) keeps the schedule's parameters out
    of the scheduler's state_dict, so a resumed run follows its own config (e.g. a longer train.steps)."""
    schedule, warmup, decay = optim.schedule, optim.warmup_steps, optim.decay_fraction
    min_ratio = optim.min_lr / optim.lr

    def multiplier(step: int) -> float:
        return lr_multiplier(step, schedule, warmup, total_steps, min_ratio, decay)

    return multiplier
