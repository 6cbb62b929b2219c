"""PopulationVectorEnv: K QAN episodes on one PopulationTrainer, as one gymnasium VectorEnv.

Sub-env i is member i of the population: the same episode as `TargetTrainingEnv` (fresh init,
optional log-uniform start LR, `control_interval` mini-batches per step, the contract's
observation, the task's reward, divergence ends the episode with -divergence_penalty). All K
members train in one batched computation per step, and their weight features and validation
passes are batched too.

Autoreset follows gymnasium's NEXT_STEP mode, which RLlib 2.60's SingleAgentEnvRunner expects:
a member that terminated at step t is reset alone at step t + 1 (its action is ignored, reward
0, the reset observation returned); the other members continue.

RLlib builds it through `config.env_runners(gym_env_vectorize_mode="vector_entry_point",
num_envs_per_env_runner=K)` with a registered creator: the runner calls the creator with the
env config plus {"num_envs": K} and expects a VectorEnv back (single_agent_env_runner.py,
`make_env`), so `PopulationVectorEnv(config)` reads K from `config["num_envs"]`.

The reward is the env's, terminal part and chance penalty included (`env.episode_end_reward`);
with `lr_schedule` cosine each member's actions correct its own cosine schedule from its start
LR, as in the env. Limits: lr action mode and one task per population (a task distribution
draws a model per episode); an episode's last step trains a full control interval even when
fewer batches remain, if the members are out of step (the default presets' episodes are a whole
number of intervals).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from qan_ray.config import from_dict
from qan_ray.contract import Observer, clean, observation_spec
from qan_ray.control import action_spec
from qan_ray.env import OBS_BOUND, episode_end_reward
from qan_ray.population import PopulationTrainer
from qan_ray.rewards import step_reward
from qan_ray.trainer import reference_run


class PopulationVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, config: dict[str, Any] | None = None, num_envs: int | None = None):
        config = dict(config or {})
        k = int(num_envs if num_envs is not None else config.pop("num_envs", 1))
        config.pop("num_envs", None)
        compile_step = bool(config.pop("compile", False))  # PopulationTrainer(compile=...)
        cfg = from_dict(config)  # QANConfig fields only: a typo raises, naming the valid keys
        if cfg.tasks:
            raise ValueError(f"tasks {list(cfg.tasks)}: a task distribution draws a model and "
                             "dataset per episode, but a population shares one model shape. "
                             "Use TargetTrainingEnv for a distribution, or one task per "
                             "PopulationVectorEnv.")
        if cfg.action_mode != "lr":
            raise ValueError(f"action_mode {cfg.action_mode!r}: PopulationVectorEnv supports "
                             "the lr mode only; use TargetTrainingEnv for minibatch mode.")
        self.cfg, self.num_envs = cfg, k
        self.rule = action_spec(cfg)
        self.trainer = PopulationTrainer(cfg, k=k, compile=compile_step)
        if cfg.mm_coef > 0:
            self.trainer.set_reference(reference_run(cfg, self.trainer.device))
        spec = observation_spec(cfg)
        self.observers = [Observer(spec, cfg.lr) for _ in range(k)]
        size = spec.size
        self.single_observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (size,), np.float32)
        self.single_action_space = gym.spaces.Discrete(cfg.num_actions)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, k)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, k)
        self.total_steps = math.ceil(self.trainer.total_batches / cfg.control_interval)
        self.episodes_started = 0
        self._t = np.zeros(k, dtype=np.int64)
        self._needs_reset = np.zeros(k, dtype=bool)
        self._last = [dict() for _ in range(k)]
        self._initial = [dict() for _ in range(k)]  # each member's episode start (val loss/acc)
        self._correction = np.ones(k)  # lr_schedule cosine: each member's factor on it
        self._base_seed = cfg.seed
        self._reset_seeds: dict[int, int] = {}

    def set_reset_seeds(self, seeds: dict[int, int]) -> None:
        """Seeds for the next starts of the given members (member -> seed), used instead of
        `seed + episodes started` (the trainer actors' episode counter hands them out)."""
        self._reset_seeds.update({int(i): int(s) for i, s in seeds.items()})

    def mark_for_reset(self, members) -> None:
        """The given members start over at the next step (NEXT_STEP autoreset), as if their
        episode had just ended (a proxy ends them when their trainer actor was replaced)."""
        self._needs_reset[np.asarray(list(members), dtype=np.int64)] = True

    # --- members ---------------------------------------------------------------------------
    def _start(self, i: int) -> None:
        seed = self._reset_seeds.pop(i, self._base_seed + self.episodes_started)
        self.episodes_started += 1
        self.trainer.reset_member(i, seed)
        lr = self.cfg.lr
        if self.cfg.lr_init_range is not None:
            low, high = (math.log(x) for x in self.cfg.lr_init_range)
            lrs = self.trainer.lr
            lrs[i] = math.exp(np.random.default_rng(seed).uniform(low, high))
            lr = self.trainer.set_lr(lrs)[i]
        self.observers[i].reset(lr)
        self._correction[i] = 1.0
        self._t[i] = 0

    def _observe(self, members: np.ndarray, train: np.ndarray, val: np.ndarray,
                 acc: np.ndarray) -> np.ndarray:
        """Observations of `members` (indices); the rows of the others are left zero."""
        tr, size = self.trainer, self.single_observation_space.shape[0]
        obs = np.zeros((self.num_envs, size), dtype=np.float32)
        weights = tr.weight_features().cpu().numpy() if self.cfg.weight_features else None
        lrs, progress = tr.lr, tr.progress
        for i in members:
            sig = self.observers[i].signals(lr=lrs[i], train_loss=float(train[i]),
                                            val_loss=float(val[i]),
                                            val_accuracy=float(acc[i]),
                                            progress=float(progress[i]))
            vec = sig if weights is None else np.concatenate([weights[i], sig])
            obs[i] = clean(vec, size)
        return obs

    def _infos(self, diverged: np.ndarray) -> dict[str, Any]:
        return {"lr": np.asarray(self.trainer.lr), "step": self._t.copy(),
                "batches": self.trainer.steps.copy(), "diverged": diverged.copy(),
                **{key: np.array([last.get(key, np.nan) for last in self._last])
                   for key in ("train_loss", "val_loss", "val_accuracy")}}

    # --- gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Every member starts a new episode; options {"seeds": [one per member]} gives each
        member's seed (default: seed + i, or the config's seed + episodes started)."""
        if seed is not None:
            self._base_seed = int(seed)
            self.episodes_started = 0
        seeds = (options or {}).get("seeds")
        if seeds is not None:
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset got {len(seeds)} seeds for {self.num_envs} members; "
                                 "pass one per member.")
            self.set_reset_seeds(dict(enumerate(seeds)))
        for i in range(self.num_envs):
            self._start(i)
        val, acc = (t.numpy() for t in self.trainer.evaluate("val"))
        train = self.trainer.initial_loss.copy()
        self._needs_reset[:] = False
        self._last = [{"train_loss": train[i], "val_loss": val[i], "val_accuracy": acc[i]}
                      for i in range(self.num_envs)]
        self._initial = [dict(last) for last in self._last]
        obs = self._observe(np.arange(self.num_envs), train, val, acc)
        return obs, self._infos(np.zeros(self.num_envs, dtype=bool))

    def step(self, actions):
        cfg, tr, k = self.cfg, self.trainer, self.num_envs
        actions = np.asarray(actions).reshape(k)
        fresh = np.flatnonzero(self._needs_reset)
        running = np.flatnonzero(~self._needs_reset)
        lrs, progress = tr.lr, tr.progress
        cosine = self.rule.schedule == "cosine"
        for i in running:
            if cosine:
                start = self.observers[i].initial_lr
                self._correction[i] = self.rule.next_correction(self._correction[i],
                                                                int(actions[i]), start)
                lrs[i] = self.rule.scheduled_lr(start, self._correction[i], progress[i])
            else:
                lrs[i] = self.rule.next_lr(lrs[i], int(actions[i]))
        tr.set_lr(lrs)
        rewards = np.zeros(k)
        terminated = np.zeros(k, dtype=bool)
        diverged = np.zeros(k, dtype=bool)
        if len(running):
            losses = tr.train(cfg.control_interval).numpy()
        else:
            losses = np.full(k, np.nan)
        # NEXT_STEP autoreset: members that ended last step start over now (their action is
        # ignored; they trained along in lockstep above, and that work is dropped here).
        for i in fresh:
            self._start(i)
        val, acc = (t.numpy() for t in tr.evaluate("val"))
        train = losses.copy()
        train[fresh] = tr.initial_loss[fresh]
        div = tr.diverged(losses)
        for i in running:
            self._t[i] += 1
            if div[i]:
                diverged[i] = terminated[i] = True
                rewards[i] = -cfg.divergence_penalty
                val[i], acc[i] = np.nan, 0.0
            else:
                last = self._last[i]
                reward, reached = step_reward(
                    cfg.reward, prev_train=last["train_loss"], train=float(train[i]),
                    prev_val=last["val_loss"], val=float(val[i]), val_accuracy=float(acc[i]),
                    target_accuracy=cfg.target_accuracy, total_steps=self.total_steps,
                    scale=cfg.reward_scale)
                terminated[i] = bool(tr.done[i]) or (cfg.reward == "time_to_target"
                                                      and reached)
                if terminated[i]:
                    reward += episode_end_reward(cfg, self._initial[i], float(val[i]),
                                                 float(acc[i]))
                rewards[i] = reward
        for i in range(k):
            self._last[i] = {"train_loss": float(train[i]), "val_loss": float(val[i]),
                             "val_accuracy": float(acc[i])}
        for i in fresh:
            self._initial[i] = dict(self._last[i])
        obs = self._observe(np.arange(k), train, val, acc)
        self._needs_reset = terminated.copy()
        truncated = np.zeros(k, dtype=bool)
        return obs, rewards, terminated, truncated, self._infos(diverged)


def make_population_env(config: dict[str, Any] | None = None) -> PopulationVectorEnv:
    """The creator to register for RLlib (`tune.register_env(name, make_population_env)`)."""
    return PopulationVectorEnv(dict(config or {}))
