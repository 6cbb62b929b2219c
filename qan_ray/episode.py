"""The control step: every rule of a QAN episode, written once, for K runs at a time.

An episode is one training run from a fresh init; a step is one control interval (the LR an
action sets, `control_interval` mini-batches, then a validation pass). Everything that drives
runs through control points calls these rules and keeps no copy of its own: the meta-training
env (`env.TargetTrainingEnv`, K = 1), the population vector env (`vector_env`, K members), the
baselines' population runner (`control.run_schedules`), `qan evaluate` (through those two), and
the Tune side (`QANScheduler` computes the LR after an action with `next_lr`; `QANReporter` tests
divergence with the same `rewards.diverged` as the trainer).

The rules:
- start LR: the config's LR, or log-uniform over `lr_init_range` drawn from the episode's seed
  (`start_lr`);
- action -> next LR (`next_lr`): with `lr_schedule` constant an action multiplies the current
  LR; with cosine it multiplies a correction c of a cosine decay from the episode's start LR,
  lr = clamp(lr0 x c x cosine_factor(progress)), so "keep" is plain cosine; clamped to
  [lr_min, lr_max];
- divergence (`rewards.diverged`): a non-finite loss or one above divergence_factor x L_0
  (the loss at init) ends the episode with -divergence_penalty; it never raises;
- step reward: `rewards.step_reward` of the task's reward kind;
- early end: under reward time_to_target an episode ends when val accuracy reaches the target;
- episode end: the last step of an episode that did not diverge also pays the terminal part of
  the final_* rewards and -chance_penalty if val accuracy is still at chance
  (`constants.at_chance`); every earlier step at chance pays -chance_step_penalty;
- the first decision: with LR actions, the action on the state at init is replaced by "keep"
  (the weights at init say nothing about the LR; a Tune trial's first decision, too, comes
  after its first interval), so no first action can kill a run;
- the rescue guard (`dying`, on with cfg.guard): after an interval, a run that is dying is
  rolled back to its last good state (weights and optimizer state, kept in memory on its
  device; its state at init if it has no good one yet) and its LR is cut by rescue_factor, at
  most max_rescues times per run; the step pays -rescue_penalty, and a diverged run is rescued
  instead of ended. `Episodes.guard_trainer` does the rollback, the cut and the snapshots.

`Episodes` holds the per-member state these rules need (start LR, correction, the last and the
first losses, the step count) as (K,) arrays; K = 1 is the same code. Plain numpy: no torch, no
trainer; callers pass the numbers their trainer produced.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from qan_ray.config import QANConfig
from qan_ray.constants import CHANCE_MARGIN, NUM_CLASSES, at_chance, chance_accuracy
from qan_ray.contract import CORRECTION_RANGE, ActionSpec, action_spec
from qan_ray.rewards import chance_penalty, diverged, step_reward, terminal_reward

RISE_MARGIN = 0.02
"""A loss this far (relative) above its value at init marks a dying run."""
LEARNED = 0.10
"""Val accuracy this far above chance counts as learned ..."""
LOST = 0.05
"""... and back within this of chance, after that, as lost."""

SIGNALS = ("train_loss", "val_loss", "val_accuracy")
"""What a step records of a run: the interval's mean train loss, then val loss and accuracy."""


def start_lr(cfg: QANConfig, seed: int) -> float:
    """The episode's start LR before clamping: `cfg.lr`, or with `lr_init_range` a log-uniform
    draw from the episode seed alone (so a resumed or replayed episode starts where it did)."""
    if cfg.lr_init_range is None:
        return float(cfg.lr)
    low, high = (math.log(x) for x in cfg.lr_init_range)
    return math.exp(np.random.default_rng(int(seed)).uniform(low, high))


def dying(train_loss: Any, val_loss: Any, val_accuracy: Any, initial_train: Any,
          initial_val: Any, best_accuracy: Any, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(K,) bool, the rescue guard's rule, after an interval: a non-finite loss, a train or val
    loss more than RISE_MARGIN above its value at init, or val accuracy back within LOST of
    chance after the run's best was LEARNED above it.

    Why these (measured on the training tasks digits-mlp and mnist1d-cnn with SGD, momentum 0.9
    and Adam, fixed LRs 1e-4..1, one decision per epoch, 2 seeds; docs/background.md): runs from
    a too-low LR never rose above their losses at init (at most 1.0000 x val, 0.9997 x train,
    over 72 runs), while every run a too-high LR killed either rose at least 1.1% (val) or 1.6%
    (train) above them, went non-finite, or fell back to chance after it had learned. Cutting
    the LR of a slow run would make it slower, so being at chance alone is not dying."""
    train = np.asarray(train_loss, dtype=np.float64).reshape(-1)
    val = np.asarray(val_loss, dtype=np.float64).reshape(-1)
    acc = np.asarray(val_accuracy, dtype=np.float64).reshape(-1)
    chance = chance_accuracy(num_classes)
    with np.errstate(invalid="ignore"):
        nonfinite = ~np.isfinite(train) | ~np.isfinite(val)
        rose = ((train > (1 + RISE_MARGIN) * np.asarray(initial_train, dtype=np.float64))
                | (val > (1 + RISE_MARGIN) * np.asarray(initial_val, dtype=np.float64)))
        lost = ((np.asarray(best_accuracy, dtype=np.float64) >= chance + LEARNED)
                & (acc <= chance + LOST))
    return nonfinite | rose | lost


def rescue_lr(rule: ActionSpec, factor: float, *, lr: float, correction: float, start: float,
              progress: float) -> tuple[float, float]:
    """(LR after a rescue, correction): x factor, or with a cosine schedule its correction x
    factor (within CORRECTION_RANGE), clamped to [lr_min, lr_max]."""
    if rule.mode == "lr" and rule.schedule == "cosine":
        low, high = CORRECTION_RANGE
        c = min(max(correction * factor, low), high)
        return rule.scheduled_lr(start, c, progress), c
    return rule.clamp(lr * factor), float(correction)


class Outcome(NamedTuple):
    """What one step did to each of K members ((K,) arrays; members that did not step: 0)."""

    rewards: np.ndarray
    ended: np.ndarray
    diverged: np.ndarray
    rescued: np.ndarray


def next_lr(rule: ActionSpec, action: int, *, lr: float, correction: float, start: float,
            progress: float) -> tuple[float, float]:
    """(LR of the next interval, correction after the action) for one run at `progress` whose
    LR is `lr` and whose episode started at LR `start`. Minibatch mode leaves both as they are
    (its action picks a class, not an LR)."""
    action = rule.checked(action)
    if rule.mode == "minibatch":
        return float(lr), float(correction)
    if rule.schedule == "cosine":
        c = rule.next_correction(correction, action, start)
        return rule.scheduled_lr(start, c, progress), c
    return rule.next_lr(lr, action), float(correction)


class Episodes:
    """The episode state of K runs and the step rules over it.

    A surface calls `start(i, ...)` when member i begins an episode (with the state at init),
    `lrs_after(actions, ...)` before an interval, `step(...)` after it with the interval's
    losses (each member's reward, end, divergence and rescue), then `guard_trainer` to roll
    rescued members back and keep the good states."""

    def __init__(self, cfg: QANConfig, k: int, total_batches: int):
        self.k = int(k)
        self.start_lrs = np.ones(self.k)
        self.correction = np.ones(self.k)
        self.t = np.zeros(self.k, dtype=np.int64)
        self.best_accuracy = np.zeros(self.k)
        self.rescues = np.zeros(self.k, dtype=np.int64)
        self.val_reference = np.full(self.k, np.nan)  # the guard's val loss at init (start)
        self.last: list[dict[str, float]] = [{} for _ in range(self.k)]
        self.first: list[dict[str, float]] = [{} for _ in range(self.k)]
        self.good: list[dict[str, float]] = [{} for _ in range(self.k)]
        self.set_task(cfg, total_batches)

    def set_task(self, cfg: QANConfig, total_batches: int) -> None:
        """The task of the next episodes (a task distribution draws one per episode)."""
        self.cfg, self.rule = cfg, action_spec(cfg)
        self.total_steps = math.ceil(int(total_batches) / cfg.control_interval)

    def start(self, i: int, lr: float, train_loss: float, val_loss: float,
              val_accuracy: float, val_reference: float | None = None) -> None:
        """Member i begins an episode at (clamped) LR `lr` in the given state at init.
        `val_reference`: a val loss the guard accepts beyond the one at init (a run trained on
        an imbalanced split first learns its class prior, which costs more than the init's
        uniform guess on a balanced validation split: `prior_val_loss`)."""
        self.val_reference[i] = float(val_loss) if val_reference is None else max(
            float(val_loss), float(val_reference))
        self.start_lrs[i], self.correction[i], self.t[i] = float(lr), 1.0, 0
        self.best_accuracy[i], self.rescues[i] = float(val_accuracy), 0
        self.last[i] = {"train_loss": float(train_loss), "val_loss": float(val_loss),
                        "val_accuracy": float(val_accuracy)}
        self.first[i] = dict(self.last[i])
        self.good[i] = dict(self.last[i])

    def lrs_after(self, actions: Any, lrs: Any, progress: Any, members: Any) -> np.ndarray:
        """The LRs of the next interval: `members` act (their actions; the first decision of an
        episode is keep), the others keep theirs."""
        out = np.array(lrs, dtype=np.float64).reshape(self.k)
        actions = np.asarray(actions).reshape(-1)
        progress = np.asarray(progress, dtype=np.float64).reshape(-1)
        first_keeps = self.rule.mode == "lr" and self.rule.keep is not None
        for i in np.asarray(members, dtype=np.int64).reshape(-1):
            action = self.rule.keep if first_keeps and self.t[i] == 0 else int(actions[i])
            out[i], self.correction[i] = next_lr(
                self.rule, action, lr=float(out[i]), correction=self.correction[i],
                start=self.start_lrs[i], progress=float(progress[i]))
        return out

    def step(self, members: Any, train_loss: Any, val_loss: Any, val_accuracy: Any,
             initial_loss: Any, done: Any) -> Outcome:
        """After an interval: each member's reward, end, divergence and rescue, for `members`
        (the others get 0 / False). A diverged member's val loss and accuracy are recorded as
        NaN and 0; a rescued member's record is its last good state's. `initial_loss` is L_0
        of each member, `done` whether its training budget is spent."""
        cfg = self.cfg
        train = np.asarray(train_loss, dtype=np.float64).reshape(-1)
        val = np.asarray(val_loss, dtype=np.float64).reshape(-1)
        acc = np.asarray(val_accuracy, dtype=np.float64).reshape(-1)
        done = np.asarray(done, dtype=bool).reshape(-1)
        initial = np.broadcast_to(np.asarray(initial_loss, dtype=np.float64), (self.k,))
        div = diverged(train, initial, cfg.divergence_factor)
        risky = dying(train, val, acc, initial, self.val_reference, self.best_accuracy)
        out = Outcome(np.zeros(self.k), np.zeros(self.k, dtype=bool),
                      np.zeros(self.k, dtype=bool), np.zeros(self.k, dtype=bool))
        for i in np.asarray(members, dtype=np.int64).reshape(-1):
            self.t[i] += 1
            if (cfg.guard and self.rescues[i] < cfg.max_rescues) and (div[i] or risky[i]):
                self.rescues[i] += 1
                out.rescued[i] = True
                out.rewards[i] = -cfg.rescue_penalty
                self.last[i] = dict(self.good[i])  # the state it is rolled back to
                if done[i]:  # the budget is spent: the run ends in its last good state
                    out.ended[i] = True
                    out.rewards[i] += self.end_reward(i)
                continue
            if div[i]:
                out.rewards[i], out.ended[i], out.diverged[i] = -cfg.divergence_penalty, 1, 1
                self.last[i] = {"train_loss": float(train[i]), "val_loss": math.nan,
                                "val_accuracy": 0.0}
                continue
            last = self.last[i]
            reward, reached = step_reward(
                cfg.reward, prev_train=last["train_loss"], train=float(train[i]),
                prev_val=last["val_loss"], val=float(val[i]), val_accuracy=float(acc[i]),
                target_accuracy=cfg.target_accuracy, total_steps=self.total_steps,
                scale=cfg.reward_scale)
            self.last[i] = {"train_loss": float(train[i]), "val_loss": float(val[i]),
                            "val_accuracy": float(acc[i])}
            self.good[i] = dict(self.last[i])
            self.best_accuracy[i] = max(self.best_accuracy[i], float(acc[i]))
            out.ended[i] = bool(done[i]) or (cfg.reward == "time_to_target" and reached)
            if out.ended[i]:
                reward += self.end_reward(i)
            elif at_chance(float(acc[i])):
                reward -= cfg.chance_step_penalty
            out.rewards[i] = reward
        return out

    def cut_lrs(self, lrs: Any, progress: Any, members: Any) -> np.ndarray:
        """The LRs after a rescue of `members`: x rescue_factor (with a cosine schedule, its
        correction x rescue_factor), clamped; the others keep theirs."""
        out = np.array(lrs, dtype=np.float64).reshape(self.k)
        progress = np.asarray(progress, dtype=np.float64).reshape(-1)
        for i in np.asarray(members, dtype=np.int64).reshape(-1):
            out[i], self.correction[i] = rescue_lr(
                self.rule, self.cfg.rescue_factor, lr=float(out[i]),
                correction=self.correction[i], start=self.start_lrs[i],
                progress=float(progress[i]))
        return out

    def guard_trainer(self, population: Any, outcome: Outcome, members: Any) -> None:
        """Carry an outcome out on a `PopulationTrainer`: rescued members are rolled back to
        their last good state at the cut LR; members that stepped normally and go on keep
        their new state as the good one."""
        rescued = np.flatnonzero(outcome.rescued)
        if len(rescued):
            population.rollback(rescued)
            population.set_lr(self.cut_lrs(population.lr, population.progress, rescued))
        members = np.asarray(members, dtype=np.int64).reshape(-1)
        good = [int(i) for i in members if not outcome.rescued[i] and not outcome.ended[i]]
        if good and self.cfg.guard:
            population.snapshot(good)

    def end_reward(self, i: int) -> float:
        """Member i's episode-end reward (it did not diverge): the terminal part of the reward
        (final_val, final_acc; 0 for the per-step kinds) plus the chance penalty."""
        return episode_end_reward(self.cfg, self.first[i], self.last[i]["val_loss"],
                                  self.last[i]["val_accuracy"])


def prior_val_loss(train_class_count, val_labels) -> float:
    """The val loss of a model that predicts the training split's class frequencies: what a run
    on an imbalanced split reaches early by learning the prior alone."""
    counts = np.asarray(train_class_count, dtype=np.float64)
    labels = np.asarray(val_labels, dtype=np.int64)
    p = counts / counts.sum()
    with np.errstate(divide="ignore"):
        return float(-np.log(p[labels]).mean()) if len(labels) else math.nan


def episode_end_reward(cfg: QANConfig, first: dict[str, float], val_loss: float,
                       val_accuracy: float) -> float:
    """The end-of-episode reward of a run that did not diverge, from its state at init (`first`:
    val_loss, val_accuracy) and its final val loss and accuracy."""
    end = terminal_reward(cfg.reward, initial_val=first["val_loss"], val=val_loss,
                          initial_accuracy=first["val_accuracy"], val_accuracy=val_accuracy,
                          scale=cfg.reward_scale)
    return end + chance_penalty(val_accuracy, cfg.chance_penalty_value, CHANCE_MARGIN,
                                NUM_CLASSES)
