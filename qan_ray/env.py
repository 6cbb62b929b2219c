"""TargetTrainingEnv: the QAN control problem as a gymnasium environment (one run).

One episode = one training run of the target network from a fresh init (`epochs_per_episode`); one
step = `control_interval` mini-batches at the hyperparameters the action set. The observation is
built by the contract's `Observer` (pooled weight statistics + normalised training signals, the
same vector a Tune trial reports through `QANReporter`). The episode's rules (start LR, action ->
LR, divergence and its penalty, rewards, early end, chance penalty) are qan_ray.episode's, at K =
1; this class only connects them to a trainer and an observer. Constructed from a plain config
dict, so RLlib can build it by name. With `cfg.tasks` (qan_ray.distribution) every reset draws the
episode's task from its seed: `cfg`, `trainer` and `total_steps` follow that task, the spaces do
not.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from qan_ray.config import QANConfig
from qan_ray.constants import run_seed
from qan_ray.contract import ActionSpec, Observer, observation_spec
from qan_ray.distribution import describe, load_config, sample_task, trainer_key
from qan_ray.episode import Episodes, prior_val_loss, start_lr
from qan_ray.trainer import TargetTrainer, reference_run

# Every entry is a symlog statistic, a log loss/LR, an accuracy, a fraction or a count of
# non-finite entries: far inside this bound.
OBS_BOUND = 1e6
TRAINER_CACHE = 8  # trainers a task-distribution env keeps (tiny models, shared data)


class TargetTrainingEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, config: dict[str, Any] | QANConfig | None = None):
        super().__init__()
        cfg = config if isinstance(config, QANConfig) else load_config(dict(config or {}))
        self.cfg = cfg
        self.trainer = TargetTrainer(cfg)
        if cfg.mm_coef > 0:
            self.trainer.set_reference(reference_run(cfg, self.trainer.device))
        self.observer = Observer(observation_spec(cfg), cfg.lr)
        self.episodes = Episodes(cfg, 1, self.trainer.total_batches)
        size = self.observer.spec.size
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (size,), np.float32)
        self.action_space = gym.spaces.Discrete(cfg.num_actions)
        self.episodes_started = 0
        self.base_cfg = cfg  # with cfg.tasks, self.cfg is the current episode's task
        self._trainers: dict[str, TargetTrainer] = {}

    @property
    def actions(self) -> ActionSpec:
        """The current task's actions (labels, keep action, LR rule)."""
        return self.episodes.rule

    @property
    def total_steps(self) -> int:
        return self.episodes.total_steps

    @property
    def _last(self) -> dict[str, float]:
        return self.episodes.last[0]

    # --- gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        episode_seed = seed if seed is not None else run_seed(self.cfg.seed,
                                                              self.episodes_started)
        self.episodes_started += 1
        if self.base_cfg.tasks:
            self._episode_trainer(episode_seed)
        tr = self.trainer
        tr.reset(episode_seed)
        initial_lr = self.cfg.lr
        if self.cfg.lr_init_range is not None:  # log-uniform start LR, seeded by the episode
            initial_lr = tr.set_lr(start_lr(self.cfg, episode_seed))
        self.observer.reset(initial_lr)
        val_loss, val_acc = self._evaluate()
        reference = None
        if self.cfg.class_imbalance > 1:  # the guard accepts the class prior's val loss
            d = tr.data
            reference = prior_val_loss(d.class_count.cpu().numpy(),
                                       d.y_val[:self.cfg.val_max_samples].cpu().numpy())
        self.episodes.start(0, initial_lr, tr.initial_loss, val_loss, val_acc, reference)
        return self._observe(tr.initial_loss, val_loss, val_acc), self._info(diverged=False)

    def step(self, action):
        tr, cfg, ep = self.trainer, self.cfg, self.episodes
        if ep.rule.mode == "minibatch":  # by the class losses of the last evaluation
            tr.class_action(ep.rule.checked(action))
        else:
            tr.set_lr(float(ep.lrs_after([action], [tr.lr], [tr.progress], [0])[0]))
        train_loss = tr.train(min(cfg.control_interval, tr.total_batches - tr.step))
        nonfinite = not math.isfinite(train_loss)
        val_loss, val_acc = (math.nan, 0.0) if nonfinite else self._evaluate()
        out = ep.step([0], [train_loss], [val_loss], [val_acc], [tr.initial_loss], [tr.done])
        ep.guard_trainer(tr.population, out, [0])
        last = ep.last[0]
        obs = self._observe(last["train_loss"], last["val_loss"], last["val_accuracy"])
        info = self._info(diverged=bool(out.diverged[0]), rescued=bool(out.rescued[0]))
        return obs, float(out.rewards[0]), bool(out.ended[0]), False, info

    # --- helpers -------------------------------------------------------------------------------
    def _episode_trainer(self, seed: int) -> None:
        """A task distribution's episode: draw its task from the seed, and build its trainer or
        reuse one of an earlier episode that differs only in LR and seed (a few per process)."""
        task = sample_task(self.base_cfg, seed)
        key = trainer_key(task)
        tr = self._trainers.pop(key, None)
        if tr is None:
            tr = TargetTrainer(task, device=self.trainer.device)
        tr.cfg = task  # same key: same data, model and batch plan; reset() applies LR and seed
        self._trainers[key] = tr  # most recently used last
        while len(self._trainers) > TRAINER_CACHE:
            self._trainers.pop(next(iter(self._trainers)))
        self.cfg, self.trainer = task, tr
        self.episodes.set_task(task, tr.total_batches)

    @property
    def initial_lr(self) -> float:
        return self.observer.initial_lr

    def _evaluate(self) -> tuple[float, float]:
        """(val loss, val accuracy); in minibatch mode per class too (kept for the
        observation, and by the trainer for the class actions)."""
        if self.cfg.action_mode != "minibatch":
            return self.trainer.evaluate("val")
        self._classes = self.trainer.evaluate_classes("val")
        return self._classes["loss"], self._classes["accuracy"]

    def _observe(self, train_loss: float, val_loss: float, val_acc: float) -> np.ndarray:
        tr = self.trainer
        classes = None
        if self.observer.spec.class_signals:
            c = self._classes
            classes = {"class_loss": c["class_loss"], "class_accuracy": c["class_accuracy"],
                       "shares": tr.class_shares, "data_shares": tr.population.data_shares}
        return self.observer.observe(tr.model, lr=tr.lr, train_loss=train_loss,
                                     val_loss=val_loss, val_accuracy=val_acc,
                                     progress=tr.progress, classes=classes)

    def _info(self, diverged: bool, rescued: bool = False) -> dict[str, Any]:
        tr, ep = self.trainer, self.episodes
        info = {"lr": tr.lr, "step": int(ep.t[0]), "batches": tr.step, "diverged": diverged,
                "rescued": rescued, "rescues": int(ep.rescues[0]),
                "task": describe(self.cfg, self.initial_lr), **self._last}
        if self.cfg.action_mode == "minibatch":  # the class mix of the next batches
            info["composition"] = tr.batch_composition()
            info["class_shares"] = tr.class_shares
            info["balanced_accuracy"] = self._classes["balanced_accuracy"]
            info["class_val_loss"] = self._classes["class_loss"]
        return info


def rollout(env: TargetTrainingEnv, act, seed: int) -> list[dict[str, Any]]:
    """One episode with `act(obs, info) -> action`; one record per control step (step 0 is the
    state after reset, with action -1). The same loop serves controllers and baselines."""
    obs, info = env.reset(seed=seed)
    records = [{"step": 0, "action": -1, "reward": 0.0, **info}]
    done = False
    while not done:
        action = int(act(obs, info))
        obs, reward, terminated, truncated, info = env.step(action)
        records.append({**info, "action": action, "reward": float(reward)})
        done = terminated or truncated
    return records
