"""Reward functions: plain values in, one float out (see shared/QAN.md, Reward)."""

from __future__ import annotations

import math


def log_improvement(previous: float, current: float) -> float:
    """-(log current - log previous): positive when the loss fell. Sums over an episode to
    -(log L_T - log L_0), the paper's telescoping reward without its 1/t weighting."""
    if not (previous > 0 and current > 0):
        return 0.0
    return math.log(previous) - math.log(current)


def step_reward(kind: str, *, prev_train: float, train: float, prev_val: float, val: float,
                val_accuracy: float, target_accuracy: float, total_steps: int,
                scale: float = 1.0) -> tuple[float, bool]:
    """(reward, reached_target) of one control step. `kind` is a QANConfig.reward value."""
    reached = val_accuracy >= target_accuracy
    if kind == "log_loss":
        return scale * log_improvement(prev_train, train), reached
    if kind == "val_loss":
        return scale * log_improvement(prev_val, val), reached
    if kind == "time_to_target":
        # -1/T per step, the episode ends when the target is met: the return is -(fraction of
        # the budget used), so reaching the target sooner is worth more.
        return -scale / max(1, total_steps), reached
    raise ValueError(f"`reward` is {kind!r}; it must be log_loss, val_loss or time_to_target.")
