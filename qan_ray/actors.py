"""Trainer actors: Ray actors that each own one target-network training run on their device.

`TrainerActor` wraps a `TargetTrainingEnv` (and so a `TargetTrainer`) inside a Ray actor. It asks
Ray for GPUs when configured (`gpus_per_actor`, fractions allowed) and picks CUDA only when
`torch.cuda.is_available()` says so inside the actor -- a declared GPU resource is not proof of a
usable GPU. Per control step one small float32 vector (plus a few floats of info) crosses the
process boundary.

`ActorEnv` is the gymnasium environment RLlib's EnvRunners step: a thin proxy that forwards
reset/step to its TrainerActor. If the actor dies (node lost, OOM, `ray.kill`), the proxy starts a
replacement at once (the dead handle is dropped first, and the replacement gets a fresh name,
`<name>-r<n>`, so nothing waits for Ray to release the old one) and ends the running episode as
truncated (flagged in its rows); finished episodes are already in the replay buffer and nothing
else is lost.

Episode seeds: every episode asks the run's `EpisodeCounter` (a named 0-CPU actor shared by all
ActorEnvs) for a global episode index, the lowest one not yet finished or handed out, and trains
with `episode_seed(meta seed, index)`. On resume the counter starts from the indices the committed
log holds, so an interrupted and resumed run trains the same episodes as an uninterrupted one and
a replacement actor never repeats one.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import ray

from qan_ray.constants import SLOT_SEED_STRIDE, episode_seed
from qan_ray.env import OBS_BOUND

ACTOR_NAMESPACE = "qan"


class _EpisodeCounter:
    """Hands out global episode indices: the lowest index that is neither done (finished or cut
    before this session, from the committed log) nor handed out in this session."""

    def __init__(self, done: list[int] | None = None):
        self.taken = set(int(i) for i in (done or []))
        self.claims: list[tuple[int, str]] = []

    def claim(self, who: str = "") -> int:
        index = 0
        while index in self.taken:
            index += 1
        self.taken.add(index)
        self.claims.append((index, who))
        return index

    def claim_many(self, n: int, who: str = "") -> list[int]:
        """`n` indices in one call (the members of a population actor starting together)."""
        return [self.claim(who) for _ in range(int(n))]

    def slot(self) -> int:
        """A number unique in this session (names a population proxy's trainer actor)."""
        self.slots = getattr(self, "slots", 0) + 1
        return self.slots

    def history(self) -> list[tuple[int, str]]:
        return list(self.claims)


EpisodeCounter = ray.remote(num_cpus=0)(_EpisodeCounter)


def start_episode_counter(name: str, done: list[int] | None = None):
    """The run's named EpisodeCounter (a previous one of that name is killed first)."""
    try:
        ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE))
    except ValueError:
        pass
    for attempt in range(40):  # a killed actor's name is released asynchronously
        try:
            return EpisodeCounter.options(name=name, namespace=ACTOR_NAMESPACE).remote(done)
        except ValueError:
            time.sleep(0.05 * (attempt + 1))
    raise RuntimeError(f"the episode counter name {name!r} stays taken in namespace "
                       f"{ACTOR_NAMESPACE!r}; another run with this name is alive. Stop it, or "
                       "use another --out.")


@dataclass
class ActorResources:
    """What each trainer actor asks Ray for."""

    cpus_per_actor: float = 1.0
    """CPUs per trainer actor (fractions allowed)."""
    gpus_per_actor: float = 0.0
    """GPUs per trainer actor (fractions allowed, e.g. 0.25 packs four actors on one GPU)."""
    torch_threads: int = 1
    """torch intra-op threads inside the actor (1 avoids oversubscribing a node's cores)."""
    resources: dict[str, float] | None = None
    """Custom Ray resources per actor, e.g. {"trainer_node": 1} to keep trainers on nodes started
    with `ray start --resources='{"trainer_node": N}'` (None = no custom resources)."""

    def validate(self) -> ActorResources:
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError(f"`cpus_per_actor`/`gpus_per_actor` are {self.cpus_per_actor!r}/"
                             f"{self.gpus_per_actor!r}; they must be >= 0. Try --gpus-per-actor "
                             "0.5 on GPU nodes, 0 on CPU-only clusters.")
        bad = {k: v for k, v in (self.resources or {}).items() if not v >= 0}
        if bad:
            raise ValueError(f"`resources` has {bad!r}; custom resource amounts must be >= 0. "
                             "Try {\"trainer_node\": 1}.")
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            raise ValueError(f"`gpus_per_actor` is {self.gpus_per_actor}; above 1 it must be a "
                             "whole number (Ray's rule). Try 1 or 2.")
        return self

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_actor}
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


class _TrainerActor:
    """Owns one TargetTrainingEnv on its device and steps it on request; with population K > 1
    a PopulationVectorEnv of K members instead (vreset / vstep)."""

    def __init__(self, env_config: dict[str, Any], torch_threads: int = 1,
                 population: int = 1):
        import torch

        torch.set_num_threads(max(1, torch_threads))
        from qan_ray.env import TargetTrainingEnv

        self.population = int(population)
        if self.population > 1:
            from qan_ray.vector_env import PopulationVectorEnv

            self.venv = PopulationVectorEnv({**env_config, "num_envs": self.population})
            self.env = None
        else:
            self.env = TargetTrainingEnv(env_config)

    def spec(self) -> dict[str, Any]:
        if self.env is None:
            v = self.venv
            return {"obs_size": int(v.single_observation_space.shape[0]),
                    "num_actions": int(v.single_action_space.n), "total_steps": v.total_steps,
                    "observation": v.observers[0].spec.to_dict(), "population": v.num_envs}
        env = self.env
        return {"obs_size": int(env.observation_space.shape[0]),
                "num_actions": int(env.action_space.n), "total_steps": env.total_steps,
                "observation": env.observer.spec.to_dict(), "population": 1}

    def population_error(self, k: int) -> str | None:
        """Why this actor's task cannot run as a population of `k` (None: it can): the
        refusals of PopulationVectorEnv / PopulationTrainer, checked on a 2-member build (a single
        member is never refused)."""
        from qan_ray.vector_env import PopulationVectorEnv

        cfg = self.env.cfg if self.env is not None else self.venv.cfg
        try:
            PopulationVectorEnv({**cfg.replace(mm_coef=0.0).to_dict(), "num_envs": 2})
        except ValueError as err:
            return str(err)
        return None

    @staticmethod
    def _member_infos(infos: dict[str, Any], k: int) -> list[dict[str, Any]]:
        now = time.time()
        return [{**{key: v[i].item() if hasattr(v[i], "item") else v[i]
                    for key, v in infos.items()}, "wall_time": now} for i in range(k)]

    def vreset(self, seeds: list[int]):
        """Every member starts an episode with its seed: (obs (K, D), per-member infos)."""
        obs, infos = self.venv.reset(options={"seeds": list(seeds)})
        return obs, self._member_infos(infos, self.venv.num_envs)

    def vrestart(self, seeds: list[int], ended: list[int]):
        """A replacement actor's first call: every member starts with its seed, and the members
        in `ended` (their episodes were cut) start over again at the next step."""
        obs, infos = self.vreset(seeds)
        self.venv.mark_for_reset(ended)
        return obs, infos

    def vstep(self, actions, reset_seeds: dict[int, int]):
        """One step of all members (NEXT_STEP autoreset: the members in `reset_seeds` start
        their next episode with that seed); infos per member."""
        self.venv.set_reset_seeds(reset_seeds)
        obs, rewards, terminated, truncated, infos = self.venv.step(np.asarray(actions))
        return (obs, rewards, terminated, truncated,
                self._member_infos(infos, self.venv.num_envs))

    def reset(self, seed: int | None = None):
        obs, info = self.env.reset(seed=seed)
        return obs, {**info, "wall_time": time.time()}

    def step(self, action: int):
        obs, reward, terminated, truncated, info = self.env.step(int(action))
        return obs, reward, terminated, truncated, {**info, "wall_time": time.time()}

    def greedy_final_accuracy(self, qnet_state: dict, spec: dict, seeds: list[int]) -> list[float]:
        """Final val accuracy of greedy episodes of a plain-torch controller (`spec`: a
        ControllerSpec dict) on this actor's task (model selection during meta-training; a
        diverged episode counts 0)."""
        from policies.qnet import Controller, plain_qnet
        from qan_ray.contract import ControllerSpec
        from qan_ray.env import rollout

        cspec = ControllerSpec.from_dict(spec)
        cspec.check_fits(self.env.observer.spec, "the selection actor's task")
        net = plain_qnet(cspec.obs_size, cspec.hidden, cspec.num_actions)
        net.load_state_dict(qnet_state)
        ctrl = Controller(net, cspec)
        return [float(rollout(self.env, lambda obs, info: ctrl.act(obs), s)[-1]["val_accuracy"])
                for s in seeds]

    def location(self) -> dict[str, Any]:
        """Where this actor runs and on what device (for placement checks)."""
        import torch

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "hostname": socket.gethostname(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_available": torch.cuda.is_available(),
                "device": str(self.env.trainer.device), "pid": os.getpid(),
                "resources": ctx.get_assigned_resources()}


TrainerActor = ray.remote(_TrainerActor)

_INFO_KEYS = ("step", "lr", "train_loss", "val_loss", "val_accuracy", "batches", "diverged",
              "rescued", "wall_time", "task")


def _row(info: dict[str, Any], action: int, reward: float, obs, actor: str
         ) -> dict[str, Any]:
    """One control step for the Parquet log; `obs` (the state the action was chosen in) is kept
    only until the driver drains it and computes the acting module's Q-values."""
    return {**{k: info.get(k) for k in _INFO_KEYS}, "action": action, "reward": reward,
            "obs": obs, "actor": actor}


def drain_finished_episodes(env_runner) -> list[list[dict[str, Any]]]:
    """Run on an RLlib EnvRunner: pop the finished episodes of its ActorEnvs (or of its one
    ActorVectorEnv, all K members' episodes) and attach the acting module's Q-values to every
    step (one batched forward pass per episode)."""
    import torch
    from ray.rllib.core.columns import Columns

    module = env_runner.module
    vector_env = env_runner.env.unwrapped
    out = []
    for env in getattr(vector_env, "envs", [vector_env]):
        env = env.unwrapped
        episodes, env.finished = env.finished, []
        for rows in episodes:
            acted = [r for r in rows if r["obs"] is not None]
            if acted and module is not None:
                obs = torch.as_tensor(np.stack([r["obs"] for r in acted]), dtype=torch.float32)
                with torch.no_grad():
                    q = module.compute_q_values({Columns.OBS: obs})["qf_preds"]
                for r, qv in zip(acted, q.numpy()):
                    r["q_values"] = qv.astype(np.float32).tolist()
            for r in rows:
                r.pop("obs", None)
            out.append(rows)
    return out


def start_trainer_actor(env_config: dict[str, Any], resources: ActorResources,
                        name: str | None = None, population: int = 1):
    """A TrainerActor with the configured resources (named in the `qan` namespace if given),
    hosting `population` members (1: one TargetTrainingEnv)."""
    opts = resources.options()
    if name:
        opts.update(name=name, namespace=ACTOR_NAMESPACE)
    return TrainerActor.options(**opts).remote(env_config, resources.torch_threads,
                                               population)


class ActorEnv(gym.Env):
    """gymnasium env proxy to a TrainerActor; built by RLlib EnvRunners from `env_config`:
    {"qan": QANConfig dict, "resources": ActorResources dict, "run": run name}."""

    metadata = {"render_modes": []}

    def __init__(self, env_config: dict[str, Any]):
        super().__init__()
        self._qan = dict(env_config.get("qan", {}))
        self._resources = ActorResources(**env_config.get("resources", {})).validate()
        worker = getattr(env_config, "worker_index", 0)
        vector = getattr(env_config, "vector_index", 0)
        self.base_name = self.name = f"trainer-{env_config.get('run', 'qan')}-{worker}-{vector}"
        self._counter_name = env_config.get("counter")
        self._meta_seed = int(env_config.get("meta_seed", 0))
        self._counter = None
        # Without a counter (a bare ActorEnv): this sub-env's own episodes (constants: the slot's
        # seeds).
        slot = worker * 1000 + vector
        self._qan["seed"] = int(self._qan.get("seed", 0)) + SLOT_SEED_STRIDE * slot
        self._local_episodes = 0
        self.index: int | None = None
        self.seed: int | None = None
        self.replacements = 0
        self.replace_seconds: list[float] = []
        self._rows: list[dict[str, Any]] = []  # control steps of the running episode
        self.finished: list[list[dict[str, Any]]] = []  # finished episodes, drained by the driver
        self._actor = self._start()
        spec = ray.get(self._actor.spec.remote())
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (spec["obs_size"],),
                                                np.float32)
        self.action_space = gym.spaces.Discrete(spec["num_actions"])
        self._last_obs = np.zeros(spec["obs_size"], np.float32)

    def _start(self):
        try:
            return start_trainer_actor(self._qan, self._resources, self.name)
        except ValueError:  # the name is still held (e.g. a run of the same name): go unnamed
            return start_trainer_actor(self._qan, self._resources, None)

    def _replace(self) -> None:
        """Drop the dead handle first (Ray keeps an actor's name while a handle lives), then
        start the replacement under a fresh name and wait until it answers."""
        t0 = time.perf_counter()
        dead, self._actor = self._actor, None
        try:
            ray.kill(dead, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass
        del dead
        self.replacements += 1
        self.name = f"{self.base_name}-r{self.replacements}"
        self._actor = self._start()
        ray.get(self._actor.spec.remote())
        self.replace_seconds.append(time.perf_counter() - t0)

    def _next_episode(self) -> tuple[int | None, int]:
        """(global index, seed) of the next episode: from the run's EpisodeCounter, or this
        sub-env's own count without one."""
        if self._counter_name is None:
            self._local_episodes += 1
            return None, self._qan["seed"] + self._local_episodes - 1
        if self._counter is None:
            self._counter = ray.get_actor(self._counter_name, namespace=ACTOR_NAMESPACE)
        index = int(ray.get(self._counter.claim.remote(self.name)))
        return index, episode_seed(self._meta_seed, index)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        # RLlib's reset seed is ignored: the episode's seed comes from its global index.
        super().reset(seed=seed)
        self.index, self.seed = self._next_episode()
        try:
            obs, info = ray.get(self._actor.reset.remote(self.seed))
        except ray.exceptions.RayActorError:
            self._replace()
            obs, info = ray.get(self._actor.reset.remote(self.seed))
        self._last_obs = obs
        self._rows = [_row(info, -1, 0.0, obs=None, actor=self.name)]
        return obs, {**info, "actor": self.name, "global_episode": self.index,
                     "seed": self.seed}

    def step(self, action):
        try:
            obs, reward, terminated, truncated, info = ray.get(self._actor.step.remote(action))
        except ray.exceptions.RayActorError:
            # The trainer died mid-episode: replace it and end this episode as truncated (its
            # earlier transitions stay valid; the next reset starts on the new actor with the
            # next unused episode index, never this one again).
            cut = self.name
            self._replace()
            self._finish(truncated=True)
            return self._last_obs, 0.0, False, True, {"actor_replaced": True, "actor": cut,
                                                      "replacement": self.name}
        self._rows.append(_row(info, int(action), float(reward), obs=self._last_obs,
                               actor=self.name))
        self._last_obs = obs
        if terminated or truncated:
            self._finish()
        return obs, reward, terminated, truncated, {**info, "actor": self.name}

    def _finish(self, truncated: bool = False) -> None:
        for r in self._rows:
            r.update(global_episode=self.index, seed=self.seed, truncated=truncated,
                     cut="actor" if truncated else None)
        if len(self._rows) > 1:
            self.finished.append(self._rows)
        self._rows = []

    def close(self) -> None:
        try:
            ray.kill(self._actor)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass


_VECTOR_INFO_KEYS = ("step", "lr", "batches", "diverged", "val_accuracy")


class ActorVectorEnv(gym.vector.VectorEnv):
    """gymnasium VectorEnv proxy to a TrainerActor hosting a PopulationVectorEnv of K members
    (K = env_config["num_envs"], which RLlib sets from `num_envs_per_env_runner` when
    `gym_env_vectorize_mode="vector_entry_point"`): reset/step of all K members is one remote
    call. Autoreset is gymnasium's NEXT_STEP mode, as PopulationVectorEnv's.

    Like ActorEnv, it keeps one row per control step per member for the Parquet log
    (`finished`, drained by `drain_finished_episodes`), and every member's episode asks the
    run's EpisodeCounter for its global index and seed. If the actor dies, a replacement starts
    at once and all K running episodes end as truncated (flagged in their rows); members that
    were starting an episode start it on the replacement with the index they were given."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, env_config: dict[str, Any]):
        super().__init__()
        k = int(env_config.get("num_envs", env_config.get("population", 1)))
        if k < 1:
            raise ValueError(f"num_envs is {k}; a population actor needs >= 1 members. Try "
                             "--population 4.")
        self.num_envs = k
        self._qan = dict(env_config.get("qan", {}))
        self._resources = ActorResources(**env_config.get("resources", {})).validate()
        self._counter_name = env_config.get("counter")
        self._meta_seed = int(env_config.get("meta_seed", 0))
        self._counter = None
        # RLlib's vector entry point passes a plain dict (no worker index): number the proxy
        # from the run's counter (unique in the session), else by process.
        worker = getattr(env_config, "worker_index", None)
        if worker is None:
            worker = (f"p{ray.get(self._get_counter().slot.remote())}"
                      if self._counter_name else f"pid{os.getpid()}")
        self.base_name = self.name = f"trainer-{env_config.get('run', 'qan')}-{worker}"
        self._local_episodes = 0
        self.index: list[int | None] = [None] * k
        self.seed: list[int | None] = [None] * k
        self.replacements = 0
        self.replace_seconds: list[float] = []
        self._rows: list[list[dict[str, Any]]] = [[] for _ in range(k)]
        self.finished: list[list[dict[str, Any]]] = []
        self._needs_reset = np.zeros(k, dtype=bool)
        self._pending: dict[int, tuple[int | None, int]] = {}  # given out, not started yet
        self._actor = self._start()
        spec = ray.get(self._actor.spec.remote())
        self.single_observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND,
                                                       (spec["obs_size"],), np.float32)
        self.single_action_space = gym.spaces.Discrete(spec["num_actions"])
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, k)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, k)
        self._last_obs = np.zeros((k, spec["obs_size"]), np.float32)

    # --- actors and episodes ---------------------------------------------------------------
    def _get_counter(self):
        if self._counter is None:
            self._counter = ray.get_actor(self._counter_name, namespace=ACTOR_NAMESPACE)
        return self._counter

    def _start(self):
        try:
            return start_trainer_actor(self._qan, self._resources, self.name, self.num_envs)
        except ValueError:  # the name is still held: go unnamed
            return start_trainer_actor(self._qan, self._resources, None, self.num_envs)

    _replace = ActorEnv._replace

    def _claim(self, members) -> dict[int, tuple[int | None, int]]:
        """member -> (global index, seed) of its next episode: one counter call for all (a
        member given an index before its actor died keeps it)."""
        members = [int(i) for i in members]
        out = {i: self._pending.pop(i) for i in members if i in self._pending}
        new = [i for i in members if i not in out]
        if new and self._counter_name is None:
            for i in new:
                seed = int(self._qan.get("seed", 0)) + self._local_episodes
                self._local_episodes += 1
                out[i] = (None, seed)
        elif new:
            indices = ray.get(self._get_counter().claim_many.remote(len(new), self.name))
            out.update({i: (int(g), episode_seed(self._meta_seed, int(g)))
                        for i, g in zip(new, indices)})
        return out

    def _begin(self, i: int, claim: tuple[int | None, int], info: dict[str, Any]) -> None:
        self.index[i], self.seed[i] = claim
        self._rows[i] = [_row(info, -1, 0.0, obs=None, actor=self.name)]

    def _finish(self, i: int, truncated: bool = False, cut: str = "actor") -> None:
        rows = self._rows[i]
        for r in rows:
            r.update(global_episode=self.index[i], seed=self.seed[i], truncated=truncated,
                     cut=cut if truncated else None)
        if len(rows) > 1:
            self.finished.append(rows)
        self._rows[i] = []

    def _vector_info(self, infos: list[dict[str, Any]], **extra) -> dict[str, Any]:
        out = {key: np.array([inf.get(key, np.nan) for inf in infos])
               for key in _VECTOR_INFO_KEYS}
        out["global_episode"] = np.array([-1 if g is None else g for g in self.index])
        out["seed"] = np.array([-1 if s is None else s for s in self.seed])
        return {**out, **{key: np.asarray(v) for key, v in extra.items()}}

    # --- gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        # RLlib's reset seed is ignored: each member's seed comes from its global index.
        claims = self._claim(range(self.num_envs))
        seeds = [claims[i][1] for i in range(self.num_envs)]
        try:
            obs, infos = ray.get(self._actor.vreset.remote(seeds))
        except ray.exceptions.RayActorError:
            self._replace()
            obs, infos = ray.get(self._actor.vreset.remote(seeds))
        for i in range(self.num_envs):
            self._begin(i, claims[i], infos[i])
        self._needs_reset[:] = False
        self._last_obs = obs
        return obs, self._vector_info(infos)

    def step(self, actions):
        k = self.num_envs
        actions = np.asarray(actions).reshape(k)
        fresh = np.flatnonzero(self._needs_reset)
        claims = self._claim(fresh)
        try:
            obs, rewards, terminated, truncated, infos = ray.get(self._actor.vstep.remote(
                actions, {i: seed for i, (_, seed) in claims.items()}))
        except ray.exceptions.RayActorError:
            return self._after_death(claims)
        for i in range(k):
            if i in claims:  # NEXT_STEP autoreset: this member started its next episode
                self._begin(i, claims[i], infos[i])
                continue
            self._rows[i].append(_row(infos[i], int(actions[i]), float(rewards[i]),
                                      obs=self._last_obs[i], actor=self.name))
            if terminated[i] or truncated[i]:  # truncated here: a generation's end
                self._finish(i, truncated=bool(truncated[i]) and not terminated[i],
                             cut="generation")
        self._needs_reset = np.asarray(terminated, dtype=bool) | np.asarray(truncated, bool)
        self._last_obs = obs
        return obs, rewards, terminated, truncated, self._vector_info(infos)

    def _after_death(self, claims: dict[int, tuple[int | None, int]]):
        """The trainer died mid-step: replace it, end the K running episodes as truncated
        (their earlier transitions stay valid) and start the members that were resetting on
        the replacement; the cut members start over at the next step with new indices."""
        k, cut = self.num_envs, self.name
        running = [i for i in range(k) if i not in claims]
        self._replace()
        for i in running:
            self._finish(i, truncated=True)
        seeds = [claims[i][1] if i in claims else 0 for i in range(k)]
        obs, infos = ray.get(self._actor.vrestart.remote(seeds, running))
        for i in claims:
            self._begin(i, claims[i], infos[i])
        truncated = np.zeros(k, dtype=bool)
        truncated[running] = True
        self._needs_reset = truncated.copy()
        obs = np.where(truncated[:, None], self._last_obs, obs).astype(np.float32)
        self._last_obs = obs
        return (obs, np.zeros(k), np.zeros(k, dtype=bool), truncated,
                self._vector_info(infos, actor_replaced=np.ones(k, dtype=bool),
                                  replaced=np.array([cut] * k), replacement=np.array(
                                      [self.name] * k)))

    def close(self, **kwargs) -> None:
        try:
            ray.kill(self._actor)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass
