"""TargetTrainingEnv: the QAN control problem as a gymnasium environment.

One episode = one training run of the target network from a fresh init (`epochs_per_episode`);
one step = `control_interval` mini-batches at the hyperparameters the action set. The observation
is built by the contract's `Observer` (pooled weight statistics + normalised training signals,
the same vector a Tune trial reports through `QANReporter`). Divergence (the trainer's one rule:
NaN/inf or loss > divergence_factor x L_0) ends the episode with -divergence_penalty; it never
raises. The last step of an episode that did not diverge also pays the terminal reward of the
final_* rewards (qan_ray.rewards) and, whatever the reward, -chance_penalty if the run's val
accuracy is still within 2 points of chance. Constructed from a plain config dict, so RLlib can
build it by name. With `cfg.tasks` (qan_ray.distribution) every reset draws the episode's task
from its seed: `cfg`, `trainer` and `total_steps` follow that task, the spaces do not.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from qan_ray.config import QANConfig, from_dict
from qan_ray.contract import Observer, observation_spec
from qan_ray.control import action_spec, apply_action
from qan_ray.distribution import describe, sample_task, trainer_key
from qan_ray.rewards import chance_penalty, step_reward, terminal_reward
from qan_ray.trainer import TargetTrainer, reference_run

# Every entry is a symlog statistic, a log loss/LR, an accuracy, a fraction or a count of
# non-finite entries: far inside this bound.
OBS_BOUND = 1e6
TRAINER_CACHE = 8  # trainers a task-distribution env keeps (tiny models, shared data)


class TargetTrainingEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, config: dict[str, Any] | QANConfig | None = None):
        super().__init__()
        cfg = config if isinstance(config, QANConfig) else from_dict(dict(config or {}))
        self.cfg = cfg
        self.trainer = TargetTrainer(cfg)
        if cfg.mm_coef > 0:
            self.trainer.set_reference(reference_run(cfg, self.trainer.device))
        self.observer = Observer(observation_spec(cfg), cfg.lr)
        self.actions = action_spec(cfg)
        self._correction = 1.0
        size = self.observer.spec.size
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (size,), np.float32)
        self.action_space = gym.spaces.Discrete(cfg.num_actions)
        self.total_steps = math.ceil(self.trainer.total_batches / cfg.control_interval)
        self.episodes_started = 0
        self._last: dict[str, float] = {}
        self.base_cfg = cfg  # with cfg.tasks, self.cfg is the current episode's task
        self._trainers: dict[str, TargetTrainer] = {}

    # --- gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        episode_seed = seed if seed is not None else self.cfg.seed + self.episodes_started
        self.episodes_started += 1
        if self.base_cfg.tasks:
            self._episode_trainer(episode_seed)
        tr = self.trainer
        tr.reset(episode_seed)
        initial_lr = self.cfg.lr
        if self.cfg.lr_init_range is not None:  # log-uniform start LR, seeded by the episode
            low, high = (math.log(x) for x in self.cfg.lr_init_range)
            u = np.random.default_rng(episode_seed).uniform(low, high)
            initial_lr = tr.set_lr(math.exp(u))
        self.observer.reset(initial_lr)
        self._correction = 1.0  # lr_schedule cosine: the controller's factor on the schedule
        val_loss, val_acc = tr.evaluate("val")
        self._t = 0
        self._last = {"train_loss": tr.initial_loss, "val_loss": val_loss, "val_accuracy": val_acc}
        self._initial = dict(self._last)  # the episode's start, for the terminal rewards
        return self._observe(tr.initial_loss, val_loss, val_acc), self._info(diverged=False)

    def step(self, action):
        tr, cfg = self.trainer, self.cfg
        if self.actions.schedule == "cosine" and self.actions.mode == "lr":
            self._correction = self.actions.next_correction(self._correction, int(action),
                                                            self.initial_lr)
            tr.set_lr(self.actions.scheduled_lr(self.initial_lr, self._correction, tr.progress))
        else:
            apply_action(tr, int(action))
        train_loss = tr.train(min(cfg.control_interval, tr.total_batches - tr.step))
        self._t += 1
        if tr.diverged(train_loss):
            nan = float("nan")
            self._last = {"train_loss": train_loss, "val_loss": nan, "val_accuracy": 0.0}
            obs = self._observe(train_loss, nan, 0.0)
            return obs, -cfg.divergence_penalty, True, False, self._info(diverged=True)
        val_loss, val_acc = tr.evaluate("val")
        reward, reached = step_reward(
            cfg.reward, prev_train=self._last["train_loss"], train=train_loss,
            prev_val=self._last["val_loss"], val=val_loss, val_accuracy=val_acc,
            target_accuracy=cfg.target_accuracy, total_steps=self.total_steps,
            scale=cfg.reward_scale)
        self._last = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc}
        terminated = tr.done or (cfg.reward == "time_to_target" and reached)
        if terminated:
            reward += self._episode_end_reward(val_loss, val_acc)
        obs = self._observe(train_loss, val_loss, val_acc)
        return obs, float(reward), bool(terminated), False, self._info(diverged=False)

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
        self.total_steps = math.ceil(tr.total_batches / task.control_interval)

    def _episode_end_reward(self, val_loss: float, val_acc: float) -> float:
        return episode_end_reward(self.cfg, self._initial, val_loss, val_acc)

    @property
    def initial_lr(self) -> float:
        return self.observer.initial_lr

    def _observe(self, train_loss: float, val_loss: float, val_acc: float) -> np.ndarray:
        tr = self.trainer
        return self.observer.observe(tr.model, lr=tr.lr, train_loss=train_loss,
                                     val_loss=val_loss, val_accuracy=val_acc,
                                     progress=tr.progress)

    def _info(self, diverged: bool) -> dict[str, Any]:
        tr = self.trainer
        info = {"lr": tr.lr, "step": self._t, "batches": tr.step, "diverged": diverged,
                "task": describe(self.cfg, self.initial_lr), **self._last}
        if self.cfg.action_mode == "minibatch":  # samples per class in the batches just used
            info["composition"] = tr.batch_composition()
        return info


def episode_end_reward(cfg: QANConfig, start: dict[str, float], val_loss: float,
                       val_acc: float) -> float:
    """Paid once, on the last step of an episode that did not diverge: the terminal part of the
    reward (final_val, final_acc; 0 for the per-step kinds; `start` holds the episode's first
    val_loss and val_accuracy) plus the chance penalty."""
    end = terminal_reward(cfg.reward, initial_val=start["val_loss"], val=val_loss,
                          initial_accuracy=start["val_accuracy"], val_accuracy=val_acc,
                          scale=cfg.reward_scale)
    return end + chance_penalty(val_acc, cfg.chance_penalty_value)


def keep_action(cfg: QANConfig) -> int:
    """The task's keep action (factor 1.0; the contract's ActionSpec.keep), or 0 if none."""
    keep = action_spec(cfg).keep
    return 0 if keep is None else keep


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
