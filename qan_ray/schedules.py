"""LR schedules as pure functions of the run's progress (0 at the start, 1 at the end).

The one definition of each formula: the baselines of `qan evaluate` (qan_ray.control), a Tune
trial's own `trial_schedule` (trainables) and the cosine that QAN's actions correct
(`contract.ActionSpec.scheduled_lr`) all call these. A schedule is a closed form of the progress,
not a step counter, so it is the same whether a run is observed once per epoch (Tune) or every
control interval (meta-training), and it survives a checkpoint restore with nothing to save.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[float], float]

WARMUP_FRACTION = 0.05
WARMUP_START = 0.1
STEP_MILESTONES = (0.5, 0.75)
STEP_GAMMA = 0.1


def cosine_factor(progress: float) -> float:
    """(1 + cos(pi p)) / 2 at progress p, clipped to [0, 1]: 1 at the start, 0 at the end."""
    p = min(max(float(progress), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * p))


def fixed(lr: float) -> Schedule:
    return lambda progress: lr


def step_decay(lr: float, milestones: tuple[float, ...] = STEP_MILESTONES,
               gamma: float = STEP_GAMMA) -> Schedule:
    """LR x gamma at each milestone (fractions of the run)."""
    return lambda progress: lr * gamma ** sum(progress >= m for m in milestones)


def cosine(lr: float, lr_min: float = 0.0) -> Schedule:
    """Cosine decay from lr to lr_min over the run."""
    return lambda progress: lr_min + (lr - lr_min) * cosine_factor(progress)


def warmup_cosine(lr: float, warmup: float = WARMUP_FRACTION, lr_min: float = 0.0,
                  start: float = WARMUP_START) -> Schedule:
    """Linear warm-up from start x lr to lr over the first `warmup` of the run, then cosine
    from lr to lr_min over the rest (the usual transformer/ResNet recipe)."""
    if not 0 <= warmup < 1:
        raise ValueError(f"`warmup` is {warmup!r}; it must lie in [0, 1). Try 0.05.")

    def sched(progress: float) -> float:
        if progress < warmup:
            return lr * (start + (1 - start) * progress / warmup)
        return lr_min + (lr - lr_min) * cosine_factor((progress - warmup) / (1 - warmup))

    return sched


SCHEDULES: dict[str, Callable[[float], Schedule]] = {
    "fixed": fixed, "step": step_decay, "cosine": cosine, "warmup_cosine": warmup_cosine}


def baseline_schedule(name: str, lr: float) -> Schedule:
    """'fixed' | 'step' | 'cosine' | 'warmup_cosine' at base LR `lr`."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} must be one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](lr)
