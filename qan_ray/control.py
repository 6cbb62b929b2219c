"""The baselines, and how an action changes a trainer outside an episode.

A baseline acts on the same trainer at the same control points as a controller, so the two
differ only in who picks the learning rate. A baseline is either a schedule (progress -> LR:
qan_ray.schedules' fixed, step, cosine, cosine with linear warm-up) or an adaptive rule that
reads the run at each control point (`AdaptiveBaseline`: torch's ReduceLROnPlateau on the
validation loss, and hypergradient descent). `run_schedules` runs many baselines x seeds as one
population through the episode rules of qan_ray.episode (the env's episodes, member by member).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from qan_ray.config import QANConfig
from qan_ray.contract import action_spec
from qan_ray.data import DeviceData
from qan_ray.episode import Episodes, start_lr
from qan_ray.population import PopulationTrainer
from qan_ray.schedules import SCHEDULES, baseline_schedule
from qan_ray.trainer import TargetTrainer


def apply_action(trainer: TargetTrainer, action: int) -> None:
    """Change the trainer as `action` says, now: the LR times the action's factor (the
    constant-schedule rule, `ActionSpec.next_lr`), or in minibatch mode a bounded step of its
    class shares. An episode's actions go through `episode.Episodes` instead, which also
    knows the cosine schedule."""
    spec = action_spec(trainer.cfg)
    if spec.mode == "minibatch":
        trainer.class_action(spec.checked(action))
    else:
        trainer.set_lr(spec.next_lr(trainer.lr, action))


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


# --- baselines over a population --------------------------------------------------------------
class Member:
    """Member i of a population seen as one trainer: what a baseline (`AdaptiveBaseline`) reads
    and writes at a control point (cfg, lr, set_lr, model, step, progress, episode)."""

    def __init__(self, population: PopulationTrainer, i: int):
        self.population, self.i = population, int(i)
        self.episode = 0  # a new run of the member: bump it (the baseline restarts its rule)

    @property
    def cfg(self) -> QANConfig:
        return self.population.cfg

    @property
    def lr(self) -> float:
        return self.population.lr[self.i]

    def set_lr(self, lr: float) -> float:
        lrs = self.population.lr
        lrs[self.i] = float(lr)
        return self.population.set_lr(lrs)[self.i]

    @property
    def model(self) -> nn.Module:
        return self.population.member_model(self.i)

    @property
    def step(self) -> int:
        return int(self.population.steps[self.i])

    @property
    def progress(self) -> float:
        return float(self.population.progress[self.i])


def run_schedules(cfg: QANConfig, members: Sequence[tuple[Any, float, int]],
                  data: DeviceData | None = None, device: torch.device | str | None = None
                  ) -> tuple[list[list[dict]], list[float]]:
    """Episodes of baselines (BASELINES: the schedules fixed, step, cosine, warmup_cosine and
    the adaptive plateau and hypergradient), one population member per (baseline name, base LR,
    seed), all trained in lockstep. A member's baseline may also be an `AdaptiveBaseline` object
    instead of a name (a policy of your own, e.g. from a search).

    Each member's records are what `env.rollout` gives for `evaluate.run_schedule` on a
    TargetTrainingEnv of `cfg` (step 0 after reset, then one per control step: lr, batches,
    diverged, train/val loss, val accuracy, action = keep, reward), to float tolerance
    (tests/test_population.py): the same episode rules (qan_ray.episode), and at every control
    point the member's baseline reads that point's info and sets the LR of the next interval.
    The second value is each member's final test accuracy. A member whose episode ends
    (diverged, or reached the target under reward time_to_target) stops recording and is frozen
    (LR 0) while the others train on."""
    if not members:
        raise ValueError("run_schedules needs at least one (baseline, lr, seed) member.")
    baselines = [make_baseline(name, lr) if isinstance(name, str) else name
                 for name, lr, _ in members]
    seeds = [seed for *_, seed in members]
    pop = PopulationTrainer(cfg, seeds=seeds, data=data, device=device)
    views = [Member(pop, i) for i in range(pop.k)]
    k, keep = pop.k, action_spec(cfg).keep_action
    episodes = Episodes(cfg, k, pop.total_batches)
    if cfg.lr_init_range is not None:  # the env's log-uniform start LR (its step-0 record)
        pop.set_lr([start_lr(cfg, seed) for seed in seeds])
    val, acc = (t.tolist() for t in pop.evaluate("val"))
    lrs = pop.lr
    for i in range(k):
        episodes.start(i, lrs[i], float(pop.initial_loss[i]), val[i], acc[i])
    records = [[{"step": 0, "action": -1, "reward": 0.0, "lr": lrs[i], "batches": 0,
                 "diverged": False, "rescued": False, "rescues": 0, **episodes.last[i]}]
               for i in range(k)]
    running = np.ones(k, dtype=bool)
    while running.any() and not pop.done.all():
        lrs = pop.lr
        members_now = np.flatnonzero(running)
        for i in members_now:
            lrs[i] = baselines[i].next_lr(views[i], {**records[i][-1]})
        lrs = pop.set_lr(lrs)
        losses = pop.train(min(cfg.control_interval, pop.total_batches - int(pop.steps[0])))
        val, acc = pop.evaluate("val")
        out = episodes.step(members_now, losses.numpy(), val.numpy(), acc.numpy(),
                            pop.initial_loss, pop.done)
        episodes.guard_trainer(pop, out, members_now)
        for i in members_now:
            records[i].append({"lr": lrs[i], "step": int(episodes.t[i]),
                               "batches": int(pop.steps[i]), "diverged": bool(out.diverged[i]),
                               "rescued": bool(out.rescued[i]),
                               "rescues": int(episodes.rescues[i]), **episodes.last[i],
                               "action": keep, "reward": float(out.rewards[i])})
            if out.ended[i]:
                running[i] = False
                pop.freeze(i)
    _, test_acc = pop.evaluate("test")
    return records, test_acc.tolist()
