"""The learning-rate schedule: a linear warm-up, then constant or a cosine decay to ``train.max_steps``.

A pure function of the step and the configuration, so a resumed run sets the same rate at the same step as one
that never stopped (nothing about the schedule is stored in checkpoints).
"""

from __future__ import annotations

import math

#: ``optim.schedule`` values
SCHEDULES = ("constant", "cosine")


def learning_rate(step: int, peak: float, *, warmup_steps: int = 0, schedule: str = "constant",
                  max_steps: int = 1, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimiser step ``step`` (1-based).

    Steps ``1..warmup_steps`` ramp linearly to ``peak`` (step ``k`` gets ``peak·k/warmup_steps``). After that
    ``constant`` keeps ``peak``; ``cosine`` follows half a cosine from ``peak`` at ``warmup_steps`` to
    ``peak·min_lr_ratio`` at ``max_steps`` and stays there for any step beyond it.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_steps and step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return peak
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
