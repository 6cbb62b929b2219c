"""Actions (how a controller changes the trainer) and the baseline schedules.

Both act on the same `TargetTrainer` at the same control points, so a controller and a baseline
differ only in who picks the learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from qan_ray.config import QANConfig
from qan_ray.trainer import TargetTrainer


def action_labels(cfg: QANConfig) -> list[str]:
    """A short label per action index, for logs, specs and plots."""
    if cfg.action_mode == "minibatch":
        return [f"class {c}" for c in range(10)]
    labels = ["keep" if f == 1.0 else f"x{f:g}" for f in cfg.lr_factors]
    if cfg.restart_lr is not None:
        labels.append(f"restart {cfg.restart_lr:g}")
    return labels


def next_lr(cfg: QANConfig, lr: float, action: int) -> float:
    """The LR after `action` in lr mode, clamped to [lr_min, lr_max]."""
    if action < len(cfg.lr_factors):
        lr = lr * cfg.lr_factors[action]
    else:
        lr = float(cfg.restart_lr)
    return min(max(lr, cfg.lr_min), cfg.lr_max)


def apply_action(trainer: TargetTrainer, action: int) -> None:
    """Change the trainer as `action` says; takes effect on the very next mini-batch."""
    cfg = trainer.cfg
    action = int(action)
    if not 0 <= action < cfg.num_actions:
        raise ValueError(f"action {action} is outside 0..{cfg.num_actions - 1} for action_mode "
                         f"{cfg.action_mode!r}.")
    if cfg.action_mode == "minibatch":
        trainer.set_focus_class(action)
    else:
        trainer.set_lr(next_lr(cfg, trainer.lr, action))


# --- baseline schedules: progress in [0, 1] -> learning rate -----------------------------------
Schedule = Callable[[float], float]


def fixed(lr: float) -> Schedule:
    return lambda progress: lr


def step_decay(lr: float, milestones: tuple[float, ...] = (0.5, 0.75),
               gamma: float = 0.1) -> Schedule:
    """LR x gamma at each milestone (fractions of the episode)."""
    return lambda progress: lr * gamma ** sum(progress >= m for m in milestones)


def cosine(lr: float, lr_min: float = 0.0) -> Schedule:
    return lambda progress: lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


def baseline_schedule(name: str, lr: float) -> Schedule:
    """'fixed' | 'step' | 'cosine' at base LR `lr`."""
    makers = {"fixed": fixed, "step": step_decay, "cosine": cosine}
    if name not in makers:
        raise ValueError(f"baseline {name!r} must be one of {sorted(makers)}.")
    return makers[name](lr)
