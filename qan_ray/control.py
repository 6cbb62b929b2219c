"""Actions (how a controller changes the trainer) and the baseline schedules.

Both act on the same `TargetTrainer` at the same control points, so a controller and a baseline
differ only in who picks the learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from qan_ray.config import QANConfig
from qan_ray.contract import ActionSpec
from qan_ray.trainer import TargetTrainer


def action_spec(cfg: QANConfig) -> ActionSpec:
    """The task config's actions (labels, keep action, LR rule)."""
    return ActionSpec.from_config(cfg).validate()


def apply_action(trainer: TargetTrainer, action: int) -> None:
    """Change the trainer as `action` says; takes effect on the very next mini-batch."""
    spec = action_spec(trainer.cfg)
    lr = spec.next_lr(trainer.lr, action)  # validates the action index
    if spec.mode == "minibatch":
        trainer.set_focus_class(int(action))
    else:
        trainer.set_lr(lr)


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
