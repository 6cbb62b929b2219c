"""Numbers every layer agrees on: the class count and chance level, and the seed formulas.

Plain values and pure functions, no imports from the project: the lowest layer.

Seeds. Every episode's init, batch order and start LR are functions of one integer seed, and the
seed ranges of the project's uses are disjoint, so an evaluation never replays a training
episode:
- a run's own episodes (an env, a population, a bare trainer actor): `run_seed(cfg.seed, e)` =
  cfg.seed + e for its e-th episode (or member);
- meta-training episodes handed out by `qan train`'s episode counter: `episode_seed(meta seed,
  i)` = 10,000,000 x (meta seed + 1) + i over all actors, so resume reproduces them;
- model selection during `qan train`: `selection_seed(i)` = 2,000,000 + i;
- `qan evaluate` and the benchmarks: `eval_seed(i)` = 1,000,000 + i;
- the meta-momentum reference run (W*): cfg.seed + REFERENCE_SEED_OFFSET.
"""

from __future__ import annotations

import math

NUM_CLASSES = 10
"""Classes of every built-in task (digits, MNIST, Fashion-MNIST, CIFAR-10, MNIST-1D)."""
CHANCE_MARGIN = 0.02
"""A run whose val accuracy is within this of chance (1 / classes) is at chance."""

DEAD_MARGIN = 0.05
"""A run whose final val accuracy is within this of chance is a dead run (trial)."""

EVAL_SEED_BASE = 1_000_000
SELECTION_SEED_BASE = 2_000_000
EPISODE_SEED_BASE = 10_000_000
REFERENCE_SEED_OFFSET = 10_000
SLOT_SEED_STRIDE = 10_000
"""A bare trainer actor without an episode counter: slot s runs seeds cfg.seed + s x stride + e."""


def chance_accuracy(num_classes: int = NUM_CLASSES) -> float:
    """Accuracy of a uniform guess."""
    return 1.0 / num_classes


def at_chance(val_accuracy: float, num_classes: int = NUM_CLASSES,
              margin: float = CHANCE_MARGIN) -> bool:
    """True when `val_accuracy` is within `margin` of chance (or not a number)."""
    return not math.isfinite(val_accuracy) or val_accuracy <= chance_accuracy(num_classes) + margin


def is_dead(final_val_accuracy: float, num_classes: int = NUM_CLASSES) -> bool:
    """A dead run: it ended within DEAD_MARGIN of chance (or without a number)."""
    return at_chance(final_val_accuracy, num_classes, DEAD_MARGIN)


def run_seed(base: int, index: int) -> int:
    """Seed of a run's `index`-th episode (or population member) from its config seed `base`."""
    return int(base) + int(index)


def eval_seed(index: int) -> int:
    return EVAL_SEED_BASE + int(index)


def selection_seed(index: int) -> int:
    return SELECTION_SEED_BASE + int(index)


def episode_seed(meta_seed: int, index: int) -> int:
    """The seed of training episode `index` (0-based, over all actors) of a `qan train` run with
    `meta_seed`: a pure function, so resume and actor replacement reproduce it."""
    if meta_seed < 0 or index < 0:
        raise ValueError(f"meta seed {meta_seed} / episode index {index}: both must be >= 0. "
                         "Try --meta-seed 0.")
    return EPISODE_SEED_BASE * (int(meta_seed) + 1) + int(index)
