"""Reward functions: plain values in, one float out (see docs/background.md).

Per-step rewards (`step_reward`) are paid at every control point; the terminal rewards
(`final_val`, `final_acc`) pay 0 until the episode's last step and then the whole episode's
improvement at once (`terminal_reward`), so a discount gamma < 1 cannot favour an early LR
decay that helps the next few steps at the cost of the end (the short-horizon bias of Wu et al.,
ICLR 2018); train them with gamma = 1 or close. Whatever the reward, a run that ends still at
chance accuracy pays `chance_penalty` on its last step, and a run that diverges (`diverged`) pays
the divergence penalty.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qan_ray.constants import CHANCE_MARGIN, NUM_CLASSES, at_chance, chance_accuracy

STEP_REWARDS = ("log_loss", "val_loss", "time_to_target")
TERMINAL_REWARDS = ("final_val", "final_acc")


def log_improvement(previous: float, current: float) -> float:
    """-(log current - log previous): positive when the loss fell. Sums over an episode to
    -(log L_T - log L_0), the paper's telescoping reward without its 1/t weighting."""
    if not (previous > 0 and current > 0 and math.isfinite(previous)
            and math.isfinite(current)):
        return 0.0
    return math.log(previous) - math.log(current)


def step_reward(kind: str, *, prev_train: float, train: float, prev_val: float, val: float,
                val_accuracy: float, target_accuracy: float, total_steps: int,
                scale: float = 1.0) -> tuple[float, bool]:
    """(reward, reached_target) of one control step. `kind` is a QANConfig.reward value; the
    terminal kinds pay 0 here (their reward comes from `terminal_reward` at the end)."""
    reached = val_accuracy >= target_accuracy
    if kind == "log_loss":
        return scale * log_improvement(prev_train, train), reached
    if kind == "val_loss":
        return scale * log_improvement(prev_val, val), reached
    if kind == "time_to_target":
        # -1/T per step, the episode ends when the target is met: the return is -(fraction of
        # the budget used), so reaching the target sooner is worth more.
        return -scale / max(1, total_steps), reached
    if kind in TERMINAL_REWARDS:
        return 0.0, reached
    raise ValueError(f"`reward` is {kind!r}; it must be one of "
                     f"{STEP_REWARDS + TERMINAL_REWARDS}. Try --reward log_loss.")


def terminal_reward(kind: str, *, initial_val: float, val: float, initial_accuracy: float,
                    val_accuracy: float, scale: float = 1.0,
                    num_classes: int = NUM_CLASSES) -> float:
    """The end-of-episode part of reward `kind` (0 for the per-step kinds):
    final_val = log L_val_0 - log L_val_T; final_acc = (acc_T - acc_0) / (1 - 1/classes), the
    accuracy gained as a share of the most a run can gain from chance."""
    if kind == "final_val":
        return scale * log_improvement(initial_val, val)
    if kind == "final_acc":
        return scale * (val_accuracy - initial_accuracy) / (1.0 - chance_accuracy(num_classes))
    if kind in STEP_REWARDS:
        return 0.0
    raise ValueError(f"`reward` is {kind!r}; it must be one of "
                     f"{STEP_REWARDS + TERMINAL_REWARDS}. Try --reward final_val.")


def chance_penalty(val_accuracy: float, penalty: float, margin: float = CHANCE_MARGIN,
                   num_classes: int = NUM_CLASSES) -> float:
    """-penalty if the final val accuracy is still within `margin` of chance, else 0."""
    return -float(penalty) if at_chance(val_accuracy, num_classes, margin) else 0.0


def diverged(losses: Any, initial_losses: Any, factor: float) -> np.ndarray:
    """(K,) bool, the one divergence rule: a non-finite loss, or one above factor x L_0 (the
    run's loss at init). A diverged run's episode ends with -divergence_penalty."""
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    initial = np.broadcast_to(np.asarray(initial_losses, dtype=np.float64), losses.shape)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(losses) | (losses > factor * initial)
