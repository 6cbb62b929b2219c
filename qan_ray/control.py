"""Actions (how a controller changes the trainer) and the baselines.

Both act on the same `TargetTrainer` at the same control points, so a controller and a baseline
differ only in who picks the learning rate. A baseline is either a schedule (progress -> LR:
fixed, step, cosine, cosine with linear warm-up) or an adaptive rule that reads the run at each
control point (`AdaptiveBaseline`: torch's ReduceLROnPlateau on the validation loss, and
hypergradient descent).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

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


WARMUP_FRACTION = 0.05
WARMUP_START = 0.1


def warmup_cosine(lr: float, warmup: float = WARMUP_FRACTION, lr_min: float = 0.0,
                  start: float = WARMUP_START) -> Schedule:
    """Linear warm-up from start x lr to lr over the first `warmup` of the episode, then cosine
    from lr to lr_min over the rest (the usual transformer/ResNet recipe)."""
    if not 0 <= warmup < 1:
        raise ValueError(f"`warmup` is {warmup!r}; it must lie in [0, 1). Try 0.05.")

    def sched(progress: float) -> float:
        if progress < warmup:
            return lr * (start + (1 - start) * progress / warmup)
        q = (progress - warmup) / (1 - warmup)
        return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(1.0, q)))

    return sched


SCHEDULES: dict[str, Callable[[float], Schedule]] = {
    "fixed": fixed, "step": step_decay, "cosine": cosine, "warmup_cosine": warmup_cosine}


def baseline_schedule(name: str, lr: float) -> Schedule:
    """'fixed' | 'step' | 'cosine' | 'warmup_cosine' at base LR `lr`."""
    if name not in SCHEDULES:
        raise ValueError(f"baseline {name!r} must be one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](lr)


# --- adaptive baselines: they read the run at each control point ------------------------------
class AdaptiveBaseline:
    """A baseline that picks the next interval's LR from what it sees at a control point.

    `next_lr(trainer, info)` is called at every control point of an episode (step 0 is the state
    after reset), with the env's info of that point (val_loss, ...); it returns the LR the
    trainer should use until the next control point. A new episode (a fresh optimizer after
    `trainer.reset`, counted by `trainer.episode`) restarts the rule from the trainer's LR."""

    def __init__(self, lr: float):
        self.lr0 = float(lr)
        self._episode: Any = None

    def next_lr(self, trainer: TargetTrainer, info: dict[str, Any]) -> float:
        episode = (id(trainer), trainer.episode)
        if episode != self._episode:  # a new episode
            self._episode = episode
            trainer.set_lr(self.lr0)
            self.start(trainer)
        return self.update(trainer, info)

    def start(self, trainer: TargetTrainer) -> None:
        """Episode start (the trainer's optimizer is fresh, at lr0)."""

    def update(self, trainer: TargetTrainer, info: dict[str, Any]) -> float:
        raise NotImplementedError


class PlateauBaseline(AdaptiveBaseline):
    """torch.optim.lr_scheduler.ReduceLROnPlateau, stepped with the validation loss at each
    control point (one decision per epoch is what a Tune trainable reports, so `patience` counts
    control points). The scheduler drives a one-parameter torch.optim.SGD that only carries the
    LR (the trainer's optimizer is the population's, which torch's schedulers cannot wrap); its
    LR is the trainer's next LR, clamped by the trainer to [lr_min, lr_max]."""

    def __init__(self, lr: float, factor: float = 0.5, patience: int = 2,
                 threshold: float = 1e-4, min_lr: float = 0.0):
        super().__init__(lr)
        self.kwargs = dict(mode="min", factor=factor, patience=patience, threshold=threshold,
                           min_lr=min_lr)
        self.scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None

    def start(self, trainer: TargetTrainer) -> None:
        kwargs = {**self.kwargs, "min_lr": max(self.kwargs["min_lr"], trainer.cfg.lr_min)}
        self._carrier = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=trainer.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self._carrier, **kwargs)

    def update(self, trainer: TargetTrainer, info: dict[str, Any]) -> float:
        val_loss = info.get("val_loss")
        if val_loss is not None and math.isfinite(val_loss):
            self.scheduler.step(val_loss)
        return float(self._carrier.param_groups[0]["lr"])


HD_BETA = 1e-3  # Baydin et al.'s hypergradient LR for SGD-HD


class HypergradientBaseline(AdaptiveBaseline):
    """Hypergradient descent (Baydin et al., ICLR 2018), SGD-HD's rule
    lr_t = lr_{t-1} + beta * g_t . g_{t-1}, applied once per control point instead of once per
    mini-batch (per-batch needs a hook inside TargetTrainer.train).

    The approximation: g_t is the interval's mean effective gradient, recovered from the
    flattened weight change of the K mini-batches since the last control point,
    g_t = -dW_t (1 - momentum) / (K lr) (exact for plain SGD; the steady-state step of heavy-ball
    momentum is lr / (1 - momentum) x g; for Adam it is the mean update direction). The
    per-batch rule adds about K g_t . g_{t-1} over an interval whose gradients persist, so the
    increment is beta K g_t . g_{t-1}. Consecutive intervals that move the weights the same way
    raise the LR; opposing moves (overshoot) lower it. The first two control points keep lr0."""

    def __init__(self, lr: float, beta: float = HD_BETA):
        super().__init__(lr)
        self.beta = float(beta)
        self._weights: torch.Tensor | None = None
        self._grad: torch.Tensor | None = None
        self._step = 0

    def start(self, trainer: TargetTrainer) -> None:
        self._weights, self._grad, self._step = _flat_weights(trainer.model), None, trainer.step

    def update(self, trainer: TargetTrainer, info: dict[str, Any]) -> float:
        k = trainer.step - self._step
        if k <= 0:  # step 0: nothing trained yet
            return trainer.lr
        weights = _flat_weights(trainer.model)
        momentum = trainer.cfg.momentum if trainer.cfg.optimizer == "sgd" else 0.0
        grad = -(weights - self._weights) * (1 - momentum) / (k * trainer.lr)
        lr = hypergradient_step(trainer.lr, grad, self._grad, self.beta * k)
        self._weights, self._grad, self._step = weights, grad, trainer.step
        return lr


def hypergradient_step(lr: float, grad: torch.Tensor, prev_grad: torch.Tensor | None,
                       beta: float) -> float:
    """lr + beta * grad . prev_grad (lr unchanged without a previous gradient)."""
    if prev_grad is None:
        return lr
    dot = float(torch.dot(grad.double(), prev_grad.double()))
    return lr + beta * dot if math.isfinite(dot) else lr


def _flat_weights(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([p.detach().flatten().float() for p in model.parameters()])


ADAPTIVE: dict[str, type[AdaptiveBaseline]] = {
    "plateau": PlateauBaseline, "hypergradient": HypergradientBaseline}
BASELINES = (*SCHEDULES, *ADAPTIVE)


def make_baseline(name: str, lr: float) -> AdaptiveBaseline:
    """Any baseline as an `AdaptiveBaseline` from LR `lr` (a schedule reads only the progress)."""
    if name in ADAPTIVE:
        return ADAPTIVE[name](lr)
    if name in SCHEDULES:
        return ScheduleBaseline(name, lr)
    raise ValueError(f"baseline {name!r} must be one of {list(BASELINES)}.")


class ScheduleBaseline(AdaptiveBaseline):
    """A schedule (progress -> LR) as a baseline."""

    def __init__(self, name: str, lr: float):
        super().__init__(lr)
        self.schedule = baseline_schedule(name, lr)

    def update(self, trainer: TargetTrainer, info: dict[str, Any]) -> float:
        return self.schedule(trainer.progress)
