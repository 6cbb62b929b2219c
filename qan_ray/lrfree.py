"""LR-free optimizers in the one training loop: what a user runs instead of tuning a learning rate.

Prodigy (Mishchenko & Defazio 2023, package `prodigyopt`), Schedule-Free SGD/AdamW (Defazio et
al. 2024, package `schedulefree`; it won the AlgoPerf 2024 self-tuning track) and D-Adaptation
(Defazio & Mishchenko 2023, package `dadaptation`) estimate the step size themselves. They come
with the `baselines` extra (`pip install -e ".[baselines]"`).

`TorchOptimizer` puts one of them behind the interface `PopulationTrainer` uses for its own
optimizer (set_lr, step_flat, reset_member, member_state / load_member_state, state_dict,
set_hyperparams), for a population of one (K = 1, `TargetTrainer`): data, batch order, model
init, evaluation and divergence rule stay the trainer's, only the update differs. A population of
K > 1 refuses these optimizers (they keep one step-size estimate per network; run K = 1).

QANConfig.optimizer names (`OPTIMIZERS`):
- `prodigy`: prodigyopt.Prodigy (Adam-like; its defaults: betas (0.9, 0.999), decoupled weight
  decay = the task's weight_decay). The LR multiplies its estimate D (1 = the package's default).
- `schedulefree-sgd` / `schedulefree-adamw`: schedulefree.SGDScheduleFree (momentum = the task's
  when it lies in (0, 1), else 0.9) / AdamWScheduleFree, with the linear warm-up the package
  recommends over the first WARMUP_FRACTION of the run's mini-batches (`warmup_steps`).
  Schedule-Free trains on one sequence of weights (y) and is evaluated on another (x, an
  average): `evaluating()` switches the model to x (the optimizer's eval()) around every
  validation/test pass and back to y (train()) after it. A trainer state (`state_dict`, the Tune
  checkpoints) holds y and the optimizer state in train mode, so a restore continues exactly;
  the weights evaluated are always x. A BatchNorm model's running statistics are those of y
  (the package's README describes recomputing them at x); the presets this is measured on have
  no BatchNorm.
- `dadapt-sgd` / `dadapt-adam`: dadaptation.DAdaptSGD (momentum = the task's) / DAdaptAdam; the
  LR multiplies D (1 = default).

What a user runs (`RECIPES`, `lr_free_runs`): `prodigy` and `dadapt` at LR 1 with a cosine decay
over the run (the Prodigy README's recipe), `schedulefree` at a constant LR with its warm-up and
no schedule -- its LR still matters, so the baselines report the best of a small grid
(`schedulefree_grid`) and say so. A method name maps to the optimizer of the task's family
(`optimizer_for`: Schedule-Free AdamW and D-Adapt Adam for Adam tasks, the SGD versions
otherwise).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the optimizer, so that the names import without it
    import torch
    from torch import nn

METHODS = ("prodigy", "schedulefree", "dadapt")
"""Baseline names (rows of `qan evaluate`, scheduler names of `qan compare`)."""
OPTIMIZERS = ("prodigy", "schedulefree-sgd", "schedulefree-adamw", "dadapt-sgd", "dadapt-adam")
"""QANConfig.optimizer values served by TorchOptimizer."""
WARMUP_FRACTION = 0.05
"""Schedule-Free's linear warm-up: this share of the run's mini-batches."""
RECIPES = {"prodigy": "cosine", "dadapt": "cosine", "schedulefree": "fixed"}
"""The LR schedule (qan_ray.schedules) each method runs with."""
PACKAGES = {"prodigy": "prodigyopt", "schedulefree": "schedulefree", "dadapt": "dadaptation"}
INSTALL = "pip install -e \".[baselines]\" (or: pip install prodigyopt schedulefree dadaptation)"


def method_of(optimizer: str) -> str:
    """The method of an optimizer name: schedulefree-sgd -> schedulefree."""
    return optimizer.partition("-")[0]


def optimizer_for(method: str, base_optimizer: str) -> str:
    """The optimizer name of `method` on a task whose own optimizer is `base_optimizer`
    (sgd | adam | adamw): the Adam variant for Adam tasks, the SGD variant otherwise."""
    if method not in METHODS:
        raise ValueError(f"LR-free method {method!r} must be one of {METHODS}.")
    if method == "prodigy":
        return "prodigy"
    adam = base_optimizer in ("adam", "adamw")
    if method == "schedulefree":
        return "schedulefree-adamw" if adam else "schedulefree-sgd"
    return "dadapt-adam" if adam else "dadapt-sgd"


def schedulefree_grid(base_optimizer: str) -> tuple[float, ...]:
    """Schedule-Free's LR grid: its README's starting points (SGD 10-50x a classical LR, AdamW
    1-10x), inside the default LR bounds [1e-5, 1]."""
    if base_optimizer in ("adam", "adamw"):
        return (0.001, 0.003, 0.01)
    return (0.1, 0.3, 1.0)


def lr_grid(method: str, base_optimizer: str) -> tuple[float, ...]:
    """The LRs a method runs from: 1 for prodigy and dadapt, the grid for schedulefree."""
    return schedulefree_grid(base_optimizer) if method == "schedulefree" else (1.0,)


def missing(methods: Sequence[str] = METHODS) -> list[str]:
    """The packages of `methods` that do not import here."""
    import importlib.util

    return [PACKAGES[m] for m in methods if importlib.util.find_spec(PACKAGES[m]) is None]


def _build(name: str, params: list[nn.Parameter], lr: float, momentum: float,
           weight_decay: float, warmup_steps: int) -> torch.optim.Optimizer:
    lr = max(float(lr), 1e-12)  # their constructors refuse 0; set_lr writes the real value
    try:
        if name == "prodigy":
            from prodigyopt import Prodigy

            return Prodigy(params, lr=lr, weight_decay=weight_decay)
        if name == "schedulefree-sgd":
            from schedulefree import SGDScheduleFree

            beta = momentum if 0 < momentum < 1 else 0.9
            return SGDScheduleFree(params, lr=lr, momentum=beta, weight_decay=weight_decay,
                                   warmup_steps=warmup_steps)
        if name == "schedulefree-adamw":
            from schedulefree import AdamWScheduleFree

            return AdamWScheduleFree(params, lr=lr, weight_decay=weight_decay,
                                     warmup_steps=warmup_steps)
        if name == "dadapt-sgd":
            from dadaptation import DAdaptSGD

            return DAdaptSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if name == "dadapt-adam":
            from dadaptation import DAdaptAdam

            return DAdaptAdam(params, lr=lr, weight_decay=weight_decay)
    except ImportError as err:
        raise ImportError(f"optimizer {name!r} needs the package {err.name!r}, which is not "
                          f"installed. Install the baselines extra: {INSTALL}.") from err
    raise ValueError(f"optimizer {name!r} is not an LR-free optimizer; use one of {OPTIMIZERS}.")


class TorchOptimizer:
    """A torch.optim LR-free optimizer over one network's parameters, with the interface of
    qan_ray.popoptim.PopulationOptimizer at K = 1. The parameters' gradients are the trainer's
    (views of its flat gradient buffer), so `step_flat(grad)` is the optimizer's step()."""

    k = 1

    def __init__(self, name: str, params: Sequence[nn.Parameter], lr: float, *,
                 momentum: float = 0.9, weight_decay: float = 0.0, total_steps: int = 1):
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is not an LR-free optimizer; use one of "
                             f"{OPTIMIZERS}.")
        self.name = self.kind = name
        self.params = list(params)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.warmup_steps = (max(1, round(WARMUP_FRACTION * total_steps))
                             if name.startswith("schedulefree") else 0)
        import torch

        self.lr = torch.tensor([float(lr)], dtype=torch.float64)
        self.opt = self._fresh()

    @property
    def schedule_free(self) -> bool:
        return self.name.startswith("schedulefree")

    def _fresh(self) -> torch.optim.Optimizer:
        opt = _build(self.name, self.params, float(self.lr[0]), self.momentum,
                     self.weight_decay, self.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = float(self.lr[0])
        if self.schedule_free:
            opt.train()  # training mode from the first step (the package's rule)
        return opt

    def set_lr(self, lr: torch.Tensor | Sequence[float] | float) -> None:
        """The LR (a multiplier of the optimizer's own step-size estimate for Prodigy and
        D-Adaptation), one value: a scalar or shape (1,)."""
        import torch

        lr_t = torch.as_tensor(lr, dtype=torch.float64).reshape(-1)
        if lr_t.numel() != 1:
            raise ValueError(f"an LR-free optimizer trains one network; got {lr_t.numel()} "
                             "LRs. Pass one LR.")
        self.lr.copy_(lr_t)
        for group in self.opt.param_groups:
            group["lr"] = float(lr_t[0])

    def set_hyperparams(self, *, momentum: float | None = None, nesterov: bool | None = None,
                        weight_decay: float | None = None) -> None:
        """Momentum (where the optimizer has one; Schedule-Free's must lie in (0, 1)) and weight
        decay from the next step; Nesterov does not apply."""
        for group in self.opt.param_groups:
            if momentum is not None and "momentum" in group and (
                    not self.schedule_free or 0 < momentum < 1):
                group["momentum"] = float(momentum)
            if weight_decay is not None:
                group["weight_decay"] = float(weight_decay)
        if momentum is not None:
            self.momentum = float(momentum)
        if weight_decay is not None:
            self.weight_decay = float(weight_decay)

    def step_flat(self, grad: torch.Tensor) -> None:
        """One step; `grad` is the trainer's flat gradient, which the parameters' .grad view."""
        self.opt.step()

    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.opt.step()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Schedule-Free: the evaluated weights x (eval()) inside, the trained ones y (train())
        after; the other optimizers evaluate the weights as they are."""
        if not self.schedule_free:
            yield
            return
        self.opt.eval()
        try:
            yield
        finally:
            self.opt.train()

    def reset_member(self, i: int = 0) -> None:
        """A fresh optimizer (a new run): no state, step 0, D at its initial estimate."""
        self._check(i)
        self.opt = self._fresh()

    def member_state(self, i: int = 0) -> dict:
        self._check(i)
        return copy.deepcopy(self.opt.state_dict())

    def load_member_state(self, i: int, state: dict) -> None:
        self._check(i)
        self.opt.load_state_dict(copy.deepcopy(state))

    def state_dict(self) -> dict:
        return {"lr": self.lr.clone(), "torch": copy.deepcopy(self.opt.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(copy.deepcopy(state["torch"]))
        self.lr.copy_(state["lr"])

    def _check(self, i: int) -> None:
        if int(i) != 0:
            raise ValueError(f"member {i}: an LR-free optimizer trains a population of one.")


def for_population(cfg, k: int, model: nn.Module, total_steps: int) -> TorchOptimizer:
    """The LR-free optimizer of `cfg.optimizer` over `model` (member 0 of a population of
    `k`); refuses k > 1, naming the fix."""
    if k != 1:
        raise ValueError(f"optimizer {cfg.optimizer!r} trains one network at a time, not a "
                         f"population of {k}: it keeps its own step-size estimate per run. Use "
                         "population size 1 (TargetTrainer, or PopulationTrainer with one seed), "
                         "or --optimizer sgd/adam for a population.")
    return TorchOptimizer(cfg.optimizer, list(model.parameters()), cfg.lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          total_steps=total_steps)
