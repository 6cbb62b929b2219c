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

The episode rules are the env's, from the same code (qan_ray.episode's `Episodes` over K members):
start LR, action -> LR (with `lr_schedule` cosine each member corrects its own cosine from its
start LR), divergence, rewards with the terminal part and chance penalty.

A task distribution (`tasks`, qan_ray.distribution) runs in generations: a generation draws one
task from the episode seed of its first member (`sample_task`, as `TargetTrainingEnv` draws an
episode's task), and its K members train that task as one population, each with its own seed,
init and start LR (log-uniform from the task's optimizer-family range, drawn from the member's
own episode seed). A member whose episode ends early (divergence, a reached target) starts
another episode of the same task. The generation ends at the first step at which every member
has ended an episode in it and none has just started one; the episodes still running then end
as truncated (gymnasium's time-limit end; they are logged, flagged and not counted), and at the
next step every member starts the next generation's task. Trainers of recent tasks are kept
(`POPULATION_CACHE`). (QANConfig refuses meta-momentum with a distribution.)

Limits: lr action mode; an episode's last step trains a full control interval even when fewer
batches remain, if the members are out of step (the default presets' episodes are a whole number
of intervals).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from qan_ray.constants import run_seed
from qan_ray.contract import ActionSpec, Observer, observation_spec
from qan_ray.distribution import describe, load_config, sample_task, task_lr_range, trainer_key
from qan_ray.env import OBS_BOUND
from qan_ray.episode import SIGNALS, Episodes, start_lr
from qan_ray.population import PopulationTrainer
from qan_ray.trainer import reference_run

POPULATION_CACHE = 2  # populations of earlier tasks a distribution env keeps for reuse


class PopulationVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, config: dict[str, Any] | None = None, num_envs: int | None = None):
        config = dict(config or {})
        k = int(num_envs if num_envs is not None else config.pop("num_envs", 1))
        config.pop("num_envs", None)
        compile_step = bool(config.pop("compile", False))  # PopulationTrainer(compile=...)
        cfg = load_config(config)  # QANConfig fields only: a typo raises, naming valid keys
        if cfg.action_mode != "lr":
            raise ValueError(f"action_mode {cfg.action_mode!r}: PopulationVectorEnv supports "
                             "the lr mode only; use TargetTrainingEnv for minibatch mode.")
        self.base_cfg, self.num_envs, self._compile = cfg, k, compile_step
        self.distribution = bool(cfg.tasks)
        self.generations = 0
        self._populations: dict[str, PopulationTrainer] = {}
        self._gen_ended = np.zeros(k, dtype=bool)  # members that ended an episode this generation
        self._switch = True  # the next start of all members begins a new generation
        # A distribution's first trainer is a draw from the config's seed, so that the spaces and
        # the device exist before reset(); reset() draws the first generation's task.
        self.cfg = self._generation_task(cfg.seed) if self.distribution else cfg
        self.trainer = self._population(self.cfg)
        if cfg.mm_coef > 0:
            self.trainer.set_reference(reference_run(cfg, self.trainer.device))
        self.episodes = Episodes(self.cfg, k, self.trainer.total_batches)
        spec = observation_spec(cfg)
        self.observers = [Observer(spec, cfg.lr) for _ in range(k)]
        size = spec.size
        self.single_observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (size,), np.float32)
        self.single_action_space = gym.spaces.Discrete(cfg.num_actions)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, k)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, k)
        self.episodes_started = 0
        self._needs_reset = np.zeros(k, dtype=bool)
        self._base_seed = cfg.seed
        self._reset_seeds: dict[int, int] = {}

    @property
    def rule(self) -> ActionSpec:
        return self.episodes.rule

    @property
    def total_steps(self) -> int:
        return self.episodes.total_steps

    def set_reset_seeds(self, seeds: dict[int, int]) -> None:
        """Seeds for the next starts of the given members (member -> seed), used instead of
        `run_seed(seed, episodes started)` (the trainer actors' episode counter hands them
        out)."""
        self._reset_seeds.update({int(i): int(s) for i, s in seeds.items()})

    def mark_for_reset(self, members) -> None:
        """The given members start over at the next step (NEXT_STEP autoreset), as if their
        episode had just ended (a proxy ends them when their trainer actor was replaced)."""
        self._needs_reset[np.asarray(list(members), dtype=np.int64)] = True

    # --- members ---------------------------------------------------------------------------
    def _generation_task(self, seed: int):
        """A generation's task drawn from `seed`, with the members' start-LR range."""
        task = sample_task(self.base_cfg, seed)
        return task.replace(lr_init_range=task_lr_range(self.base_cfg, task))

    def _population(self, task) -> PopulationTrainer:
        """The population for `task`: a kept one of a task that differs only in LR and seed
        (every member is reset before use), else a new one."""
        key = trainer_key(task.replace(lr_init_range=None))
        tr = self._populations.pop(key, None)
        if tr is None:
            device = getattr(self, "trainer", None)
            tr = PopulationTrainer(task, k=self.num_envs, compile=self._compile,
                                   device=None if device is None else device.device)
        tr.cfg = task
        self._populations[key] = tr  # most recently used last
        while len(self._populations) > POPULATION_CACHE:
            self._populations.pop(next(iter(self._populations)))
        return tr

    def _new_generation(self, seed: int) -> None:
        """Every member is about to start: draw the generation's task from `seed`."""
        self.generations += 1
        self._gen_ended[:] = False
        self._switch = False
        if not self.distribution:
            return
        self.cfg = self._generation_task(seed)
        self.trainer = self._population(self.cfg)
        self.episodes.set_task(self.cfg, self.trainer.total_batches)

    def _start(self, members: np.ndarray) -> None:
        """Reset `members` to fresh inits with their episode seeds and start LRs (when all K
        start after a generation ended, the next generation's task first)."""
        seeds = {}
        for i in members:
            seeds[int(i)] = self._reset_seeds.pop(int(i), run_seed(self._base_seed,
                                                                   self.episodes_started))
            self.episodes_started += 1
        if self._switch and len(seeds) == self.num_envs:
            self._new_generation(seeds[min(seeds)])
        tr = self.trainer
        for i, seed in seeds.items():
            tr.reset_member(int(i), seed)
            if self.cfg.lr_init_range is not None:
                lrs = tr.lr
                lrs[i] = start_lr(self.cfg, seed)
                tr.set_lr(lrs)

    def _begin(self, members: np.ndarray, val: np.ndarray, acc: np.ndarray) -> None:
        """`members` begin their episodes in the state at init (after `_start` and a val pass)."""
        lrs = self.trainer.lr
        for i in members:
            lr = lrs[i] if self.cfg.lr_init_range is not None else self.cfg.lr
            self.observers[i].reset(lr)
            self.episodes.start(int(i), lr, float(self.trainer.initial_loss[i]), float(val[i]),
                                float(acc[i]))

    def _observe(self) -> np.ndarray:
        """Every member's observation of its last recorded state."""
        tr, size = self.trainer, self.single_observation_space.shape[0]
        obs = np.zeros((self.num_envs, size), dtype=np.float32)
        weights = tr.weight_features() if self.cfg.weight_features else None
        lrs, progress = tr.lr, tr.progress
        for i in range(self.num_envs):
            last = self.episodes.last[i]
            obs[i] = self.observers[i].observe_weights(
                None if weights is None else weights[i], lr=lrs[i],
                train_loss=last["train_loss"], val_loss=last["val_loss"],
                val_accuracy=last["val_accuracy"], progress=float(progress[i]))
        return obs

    def _infos(self, diverged: np.ndarray, rescued: np.ndarray | None = None) -> dict[str, Any]:
        last = self.episodes.last
        rescued = np.zeros(self.num_envs, dtype=bool) if rescued is None else rescued
        task = describe(self.cfg).rsplit(" lr", 1)[0]  # the members' LRs are in "lr"
        return {"lr": np.asarray(self.trainer.lr), "step": self.episodes.t.copy(),
                "task": np.array([task] * self.num_envs), "generation": np.full(
                    self.num_envs, self.generations),
                "batches": self.trainer.steps.copy(), "diverged": diverged.copy(),
                "rescued": rescued.copy(), "rescues": self.episodes.rescues.copy(),
                **{key: np.array([m.get(key, np.nan) for m in last]) for key in SIGNALS}}

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
        everyone = np.arange(self.num_envs)
        self._switch = True
        self._start(everyone)
        val, acc = (t.numpy() for t in self.trainer.evaluate("val"))
        self._begin(everyone, val, acc)
        self._needs_reset[:] = False
        return self._observe(), self._infos(np.zeros(self.num_envs, dtype=bool))

    def step(self, actions):
        cfg, tr, k, ep = self.cfg, self.trainer, self.num_envs, self.episodes
        actions = np.asarray(actions).reshape(k)
        fresh = np.flatnonzero(self._needs_reset)
        running = np.flatnonzero(~self._needs_reset)
        tr.set_lr(ep.lrs_after(actions, tr.lr, tr.progress, running))
        if len(running):
            losses = tr.train(cfg.control_interval).numpy()
        else:
            losses = np.full(k, np.nan)
        # NEXT_STEP autoreset: members that ended last step start over now (their action is
        # ignored; they trained along in lockstep above, and that work is dropped here).
        self._start(fresh)
        tr = self.trainer  # a new generation (every member fresh) brings its task's trainer
        val, acc = (t.numpy() for t in tr.evaluate("val"))
        out = ep.step(running, losses, val, acc, tr.initial_loss, tr.done)
        ep.guard_trainer(tr, out, running)
        self._begin(fresh, val, acc)
        truncated = np.zeros(k, dtype=bool)
        self._gen_ended |= out.ended
        if self.distribution and self._gen_ended.all() and not len(fresh):
            truncated = ~out.ended  # the generation ends: cut the episodes still running
            self._switch = True
        self._needs_reset = out.ended | truncated
        return (self._observe(), out.rewards, out.ended.copy(), truncated,
                self._infos(out.diverged, out.rescued))


def make_population_env(config: dict[str, Any] | None = None) -> PopulationVectorEnv:
    """The creator to register for RLlib (`tune.register_env(name, make_population_env)`)."""
    return PopulationVectorEnv(dict(config or {}))
