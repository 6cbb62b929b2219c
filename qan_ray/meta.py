"""Meta-training: RLlib's DQN (new API stack) learns a controller from trainer actors.

Pattern ("one actor per training run" in docs/background.md): each of `num_actors` remote
RLlib EnvRunners (0 CPUs: they only wait) builds one `ActorEnv`, a proxy to its own
`TrainerActor`, which owns the target-network training on its device (GPU when the cluster has
one). EnvRunners step their proxies in parallel, so the N trainings run concurrently; RLlib's DQN
learner (`DQNConfig`, replay buffer, target network, epsilon schedule) learns from the
transitions. The same code runs on a laptop and on a cluster (`RAY_ADDRESS`): only resources
differ.

`qan train` writes, under --out:
  checkpoint/       RLlib Algorithm checkpoint + qan_progress.json (the commit point; resume
                    with --resume)
  controller/       exported Q-network (qnet.pt, torch.load(weights_only=True)) + spec.json;
                    with --select-every N the best greedy one on held-out selection seeds
  controller_last/  (with --select-every) the Q-network at the end of training
  steps/            Parquet log, one row per control step, one part file per commit
  progress.json     episodes done, iterations, run name (a copy of checkpoint/qan_progress.json)
  config.json       the QANConfig and MetaConfig of the run (--resume reads them back)
  learning_curve.png

`qan train --out DIR --resume [--episodes N]` continues a run from its checkpoint with the
config.json it was started with. --episodes N moves only the loop bound; the exploration schedule
(epsilon over explore_episodes, printed at the start) stays that of the original run, and a
different --explore-episodes is refused.

Commits are atomic. After every iteration that finished episodes: (1) the new Parquet part
`part-c<commit>.parquet` (temp file, rename); (2) the RLlib checkpoint and the new progress into
`checkpoint.tmp/`; (3) `checkpoint.tmp/` replaces `checkpoint/` (the previous one is kept as
`checkpoint.old/` until the new one is in place); (4) `progress.json` (temp file, rename). The
commit point is (3): a restart reads the progress inside `checkpoint/` and drops Parquet parts of
later commits, so it finds the old state or the new one, never a mix, never duplicate rows. The
exported controller folders are swapped the same way. `--resume` refuses a folder without its
config.json, or whose committed rows disagree with its progress; a run whose folder disappears
stops with an error. Ctrl-C (or SIGTERM) exports the current controller, prints how to resume and
exits 130; Ray ends with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qan_ray.config import QANConfig, add_config_arguments, documented, from_dict
from qan_ray.constants import SELECTION_SEED_BASE, selection_seed  # noqa: F401 - re-exported
from qan_ray.distribution import config_from_args, mean_episode_steps
from qan_ray.quiet import quiet_rllib
from qan_ray.records import (
    append_parts,
    fault_point,
    read_json,
    read_parts,
    recover_dir,
    swap_dir,
    write_json,
)
from qan_ray.signals import sigterm_as_sigint

PROGRESS_IN_CHECKPOINT = "qan_progress.json"
"""The committed progress, inside checkpoint/ so that it and the RLlib state swap as one."""


@dataclass
class MetaConfig:
    """How the controller is meta-trained (RLlib DQN and the actors)."""

    episodes: int = documented(20, """
        Target-network training runs (episodes) to learn from, over all actors: the loop bound
        (with --resume, the new total; the exploration schedule stays that of the original
        run).""")
    num_actors: int = documented(2, """
        Trainer actors (= RLlib EnvRunners), each running its own episodes in parallel.""")
    population: int = documented(1, """
        Target networks per trainer actor, trained in lockstep as one PopulationVectorEnv and seen
        by RLlib as one vector env of this many sub-envs (1 = one TargetTrainingEnv per actor).
        With a task distribution (--tasks) each actor trains one drawn task at a time as a
        population (generations, qan_ray.vector_env). Not for minibatch mode (refused, naming
        the fix).
        Default 1: on digits-mlp, 1 actor, 16 episodes, 2 busy cores, K = 1/4/8/16 gave
        15.3/20.6/20.5/18.0 control steps/s; at the default training intensity the DQN learner
        bounds the loop, so K > 1 was not clearly better.""")
    cpus_per_actor: float = documented(1.0, """
        CPUs per trainer actor.""")
    gpus_per_actor: float = documented(0.0, """
        GPUs per trainer actor (fractions allowed); 0 on CPU-only clusters.""")
    learner_gpus: float = documented(0.0, """
        GPUs for the DQN learner (0 = CPU; the Q-network is tiny).""")
    hidden: tuple[int, ...] = documented((64, 64), """
        Hidden widths of the controller's Q-MLP (policies/qnet.py).""")
    dqn_lr: float = documented(1e-3, """
        Adam learning rate of the DQN learner (paper: 2.5e-4 with far more episodes).""")
    gamma: float = documented(0.95, """
        Discount factor.""")
    train_batch_size: int | None = documented(None, """
        Transitions per DQN update (None: 32 with one network per actor; with --population K,
        32 x sqrt(K) rounded to a power of two, at most 256: see population_learner).""")
    replay_capacity: int = documented(20_000, """
        Replay buffer capacity in transitions (the original hard-coded 1,000).""")
    learning_starts: int = documented(100, """
        Sampled control steps before the first DQN update.""")
    training_intensity: float | None = documented(None, """
        Replayed / sampled transitions (RLlib's training_intensity; sets the update rate). None:
        16 with one network per actor; with --population K, 16 / sqrt(K), at least 1 (K
        members bring K x the fresh transitions per step: see population_learner).""")
    target_update_freq: int = documented(200, """
        Sampled steps between target-network syncs.""")
    epsilon_final: float = documented(0.05, """
        Final exploration epsilon (linear decay from 1.0).""")
    explore_fraction: float = documented(0.5, """
        Share of the exploration horizon's control steps over which epsilon decays.""")
    explore_episodes: int | None = documented(None, """
        Exploration horizon in episodes (None = episodes): epsilon decays over explore_fraction x
        explore_episodes x the control steps of one episode. Fixed when a run starts (saved in
        config.json); resuming with another --episodes moves only the loop bound.""")
    double_q: bool = documented(True, """
        Double Q-learning.""")
    n_step: int = documented(1, """
        n-step returns.""")
    seed: int = documented(0, """
        Seed of RLlib (exploration, replay sampling).""")
    select_every: int = documented(0, """
        Every this many episodes, run the greedy controller on held-out selection seeds and
        keep the best one as controller/ (the last goes to controller_last/); 0 = keep the
        last only.""")
    select_seeds: int = documented(2, """
        Selection episodes per check (seeds 2,000,000 + i: never used in training or
        evaluation).""")

    def validate(self) -> MetaConfig:
        for name in ("episodes", "num_actors", "population", "train_batch_size",
                     "replay_capacity"):
            value = getattr(self, name)
            if value is None and name == "train_batch_size":
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` is {value!r}; it must be an integer >= 1. "
                                 f"Try --{name.replace('_', '-')} 2.")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"`gamma` is {self.gamma}; it must lie in (0, 1]. Try 0.95.")
        if self.explore_episodes is not None and (not isinstance(self.explore_episodes, int)
                                                  or self.explore_episodes < 1):
            raise ValueError(f"`explore_episodes` is {self.explore_episodes!r}; it must be an "
                             "integer >= 1 (or unset for --episodes). Try --explore-episodes 20.")
        if not 0 < self.explore_fraction <= 1:
            raise ValueError(f"`explore_fraction` is {self.explore_fraction}; it must lie in "
                             "(0, 1]. Try 0.5.")
        if self.select_every < 0 or self.select_seeds < 1:
            raise ValueError(f"`select_every`/`select_seeds` are {self.select_every}/"
                             f"{self.select_seeds}; they must be >= 0 / >= 1. Try "
                             "--select-every 4 --select-seeds 2.")
        if self.training_intensity is not None and self.training_intensity <= 0:
            raise ValueError(f"`training_intensity` is {self.training_intensity}; it must be > 0"
                             ". Try 16.")
        from qan_ray.actors import ActorResources  # Ray: imported when a run starts, not by --help

        ActorResources(self.cpus_per_actor, self.gpus_per_actor).validate()
        return self


def population_learner(meta: MetaConfig) -> tuple[float, int]:
    """(replay ratio, batch size) the DQN learner runs at: the given ones, or the defaults for
    the run's population size K.

    One network per actor: ratio 16, batch 32 (the shipped generalist's settings). K members per
    actor sample K transitions per control step, so the learner sees K x the fresh data per
    second of training (less the population's own speed-up); at ratio 16 it would need K x the
    updates and set the pace of the whole run (measured: control steps/s through RLlib rose
    only 3.7x at K = 32, benchmarks/results/population_speed.md). With more fresh data less
    replay is needed, and bigger batches use the learner's time better: ratio 16 / sqrt(K) (at
    least 1) and batch 32 x sqrt(K) (a power of two, at most 256), so that the samples the
    learner trains on per hour still grow with the data rate, by about sqrt(K), while its
    updates do not. Measured in benchmarks/meta_throughput.py."""
    k = max(1, int(meta.population))
    ratio = meta.training_intensity
    if ratio is None:
        ratio = 16.0 if k == 1 else max(1.0, 16.0 / math.sqrt(k))
    batch = meta.train_batch_size
    if batch is None:
        batch = 32 if k == 1 else min(256, 32 * 2 ** round(math.log2(math.sqrt(k))))
    return float(ratio), int(batch)


def steps_per_episode(qan: QANConfig, probe_steps: int) -> int:
    """Control steps per episode that size the exploration schedule and rollout fragments: the
    task's (what the probe actor counted), or for a task distribution, whose episodes differ in
    length, the mean over the mix (not the probe's first task)."""
    return max(1, round(mean_episode_steps(qan))) if qan.tasks else int(probe_steps)


def learning_starts_problem(meta: MetaConfig, steps_per_episode: int) -> str | None:
    """Why a run of `meta.episodes` episodes cannot reach `learning_starts` (the DQN would never
    update and the exported controller would be its random initialisation), with both numbers
    and the fix; None when it can."""
    sampled = meta.episodes * steps_per_episode
    if sampled >= meta.learning_starts:
        return None
    episodes = -(-2 * meta.learning_starts // steps_per_episode)  # half the run then learns
    return (f"--episodes {meta.episodes} x {steps_per_episode} control steps per episode = "
            f"{sampled} sampled steps, fewer than --learning-starts {meta.learning_starts} (the "
            "steps the DQN samples before its first update): the DQN will NEVER UPDATE and the "
            "exported controller will be its untrained, random initialisation. Fix: "
            f"--episodes {episodes} or more, or --learning-starts {max(1, sampled // 4)} (a "
            "quarter of this run's steps).")


def dqn_progress(algo, learning_starts: int) -> dict[str, Any]:
    """What the DQN learner did so far (RLlib's lifetime counters, kept in its checkpoint):
    control steps sampled, transitions trained on, and whether the Q-network was ever updated."""
    from ray.rllib.core import ALL_MODULES
    from ray.rllib.utils.metrics import (
        ENV_RUNNER_RESULTS,
        LEARNER_RESULTS,
        NUM_ENV_STEPS_SAMPLED_LIFETIME,
        NUM_MODULE_STEPS_TRAINED_LIFETIME,
    )

    def peek(key) -> int:
        try:
            return int(algo.metrics.peek(key, default=0) or 0)
        except Exception:  # noqa: BLE001 - a counter RLlib did not create yet
            return 0

    sampled = peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME))
    trained = peek((LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME))
    return {"sampled_steps": sampled, "learning_starts": int(learning_starts),
            "trained_transitions": trained, "updated": trained > 0}


def never_updated_message(dqn: dict[str, Any]) -> str:
    return (f"NEVER UPDATED: the DQN sampled {dqn['sampled_steps']} control steps, fewer than "
            f"learning_starts {dqn['learning_starts']}, and trained on none; this controller is "
            "the untrained, random initialisation of the Q-network. Meta-train with more "
            "--episodes or a lower --learning-starts.")


def epsilon_schedule(meta: MetaConfig, steps_per_episode: int) -> list[tuple[int, float]]:
    """RLlib's epsilon schedule, in control steps sampled over all actors: linear from 1.0 to
    epsilon_final over explore_fraction x explore_episodes (default episodes) x
    steps_per_episode, then flat."""
    horizon = meta.explore_episodes or meta.episodes
    return [(0, 1.0), (max(1, int(meta.explore_fraction * horizon * steps_per_episode)),
                       meta.epsilon_final)]


def describe_schedule(schedule) -> str:
    """'epsilon 1 -> 0.05 over the first 64 control steps' for an RLlib [(t, eps), ...]."""
    (_, start), (steps, final) = schedule[0], schedule[-1]
    return f"epsilon {start:g} -> {final:g} over the first {steps} control steps"


def build_dqn_config(qan: QANConfig, meta: MetaConfig, run: str, steps_per_episode: int):
    """The real RLlib `DQNConfig` over `num_actors` ActorEnvs, or with population K > 1 over
    `num_actors` ActorVectorEnvs of K members each (epsilon: `epsilon_schedule`).

    Each EnvRunner samples rollout_fragment_length x num_envs_per_env_runner = one episode's
    control steps per member per round, and RLlib's training_intensity ratio divides by that
    same product (dqn.calculate_rr_weights), so --training-intensity keeps its meaning (replayed
    / sampled transitions) for any K."""
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from policies.rllib_module import QMLPModule
    from qan_ray.actors import ActorEnv, ActorVectorEnv

    resources = {"cpus_per_actor": meta.cpus_per_actor, "gpus_per_actor": meta.gpus_per_actor}
    k = meta.population
    ratio, batch = population_learner(meta)
    vector = ({"gym_env_vectorize_mode": "vector_entry_point"} if k > 1 else {})
    return (
        DQNConfig()
        .environment(ActorVectorEnv if k > 1 else ActorEnv,
                     env_config={"qan": qan.to_dict(), "resources": resources, "run": run,
                                 "counter": counter_name(run), "meta_seed": meta.seed})
        .framework("torch")
        .env_runners(num_env_runners=meta.num_actors, num_envs_per_env_runner=k,
                     num_cpus_per_env_runner=0, rollout_fragment_length=steps_per_episode,
                     # RLlib drops (does not wait for) a sample() that takes longer than
                     # sample_timeout_s (60 s by default): those transitions would never reach
                     # the replay buffer, though the episodes are logged. A population's
                     # fragment (K members x an episode of control steps) often takes longer,
                     # so wait for it; a dead trainer actor is replaced by its proxy.
                     sample_timeout_s=None, **vector)
        # A GPU learner runs as its own actor (the driver usually sits on a CPU head node).
        .learners(num_learners=1 if meta.learner_gpus > 0 else 0,
                  num_gpus_per_learner=meta.learner_gpus)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=QMLPModule),
                   model_config={"qan_hidden": list(meta.hidden)})
        .training(lr=meta.dqn_lr, gamma=meta.gamma,
                  train_batch_size_per_learner=batch, n_step=meta.n_step,
                  double_q=meta.double_q, dueling=False,
                  num_steps_sampled_before_learning_starts=meta.learning_starts,
                  target_network_update_freq=meta.target_update_freq,
                  # RLlib's ratio counts a local EnvRunner that does not sample here:
                  # passing R * N / (N + 1) gives the replay ratio R we ask for.
                  training_intensity=ratio * meta.num_actors
                  / (meta.num_actors + 1),
                  replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer",
                                        "capacity": meta.replay_capacity},
                  epsilon=epsilon_schedule(meta, steps_per_episode))
        .reporting(min_sample_timesteps_per_iteration=1, min_time_s_per_iteration=0)
        .debugging(seed=meta.seed)
    )


def counter_name(run: str) -> str:
    """The name of the run's EpisodeCounter actor (in the `qan` namespace)."""
    return f"episodes-{run}"


def _original_horizon(meta: MetaConfig, config_file: Path) -> MetaConfig:
    """On resume: the exploration horizon of the run's config.json (refuses a different one)."""
    saved = _read_config(config_file).get("meta", {}).get("explore_episodes")
    if saved is None:  # a run from before explore_episodes: its checkpoint holds the schedule
        return meta
    if meta.explore_episodes not in (None, saved):
        raise ValueError(f"`explore_episodes` is {meta.explore_episodes} but the run in "
                         f"{str(config_file.parent)!r} explores over {saved} episodes; the "
                         "schedule is fixed when a run starts. Leave it unset to resume, or "
                         "start a new --out.")
    return dataclasses.replace(meta, explore_episodes=saved)


def _read_config(config_file: Path) -> dict[str, Any]:
    """A run's config.json; a missing one is refused on resume (never fall back to defaults)."""
    if not config_file.exists():
        raise FileNotFoundError(
            f"--resume: {str(config_file)!r} is missing, so the run's task and meta-training "
            "settings are unknown; it must exist to resume (defaults would change the run). "
            "Restore it from a copy of the run folder, or start a new --out without --resume.")
    return read_json(config_file, "the run's config",
                     "Restore it from a copy of the run folder, or start a new --out.")


def _part_commit(path: Path) -> int | None:
    """The commit number of a `part-c<commit>.parquet` (None: a part of another naming)."""
    stem = path.name[len("part-"):-len(".parquet")]
    return int(stem[1:]) if stem.startswith("c") and stem[1:].isdigit() else None


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MetaTrainer:
    """Owns the RLlib Algorithm, the Parquet log and the checkpoint of one `qan train` run."""

    def __init__(self, qan: QANConfig, meta: MetaConfig, out: str | os.PathLike,
                 resume: bool = False, log=print):
        import ray

        from qan_ray.actors import ActorResources, start_trainer_actor

        self.qan, self.meta, self.out, self.log = qan, meta.validate(), Path(out), log
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume and (self.out / "steps").exists() and any((self.out / "steps").iterdir()):
            raise ValueError(f"--out {str(self.out)!r} already holds a run; pass --resume to "
                             "continue it, or choose a new --out (nothing was overwritten).")
        if not ray.is_initialized():
            ray.init(namespace="qan", log_to_driver=False)  # RAY_ADDRESS joins a cluster
        # Probe the task where trainers run (the data may only exist on worker nodes).
        probe = start_trainer_actor(qan.replace(mm_coef=0.0).to_dict(), ActorResources(
            meta.cpus_per_actor, meta.gpus_per_actor))
        spec = ray.get(probe.spec.remote())
        why = (ray.get(probe.population_error.remote(meta.population))
               if meta.population > 1 else None)
        ray.kill(probe)
        if why:
            raise ValueError(f"--population {meta.population}: task {qan.task!r} cannot run as "
                             f"a population ({why}) Use --population 1 (one network per "
                             "trainer actor) for it.")
        self.steps_per_episode = steps_per_episode(qan, spec["total_steps"])
        self.obs_size = spec["obs_size"]
        self.observation = spec["observation"]
        self.progress = {"episodes": 0, "iterations": 0, "run": self.out.name or "qan",
                         "started": time.time(), "commits": 0, "truncated": 0}
        self._counter = None
        if resume:
            from ray.rllib.algorithms.algorithm import Algorithm

            self.meta = _original_horizon(self.meta, self.out / "config.json")
            done = self._recover()
            if "tag" in self.progress:  # the counter the restored EnvRunners ask for
                from qan_ray.actors import start_episode_counter

                self._counter = start_episode_counter(counter_name(self.progress["tag"]), done)
            ckpt = (self.out / "checkpoint").resolve()
            try:
                with quiet_rllib():
                    self.algo = Algorithm.from_checkpoint(str(ckpt))
            except Exception as err:  # noqa: BLE001 - a corrupt checkpoint: name it, no trace
                raise ValueError(f"{str(ckpt)!r} is not a readable RLlib checkpoint "
                                 f"({type(err).__name__}: {str(err)[:300]}); it must be the "
                                 "checkpoint/ a `qan train` run committed. Restore the run "
                                 "folder from a copy, or start a new --out.") from None
            log(f"resumed from {self.out / 'checkpoint'} at episode {self.progress['episodes']}"
                f" (commit {self.progress['commits']})")
        else:
            if self.meta.explore_episodes is None:  # the horizon is fixed from here on
                self.meta = dataclasses.replace(self.meta, explore_episodes=self.meta.episodes)
            from qan_ray.actors import start_episode_counter

            self.progress["tag"] = self._run_tag()
            self._counter = start_episode_counter(counter_name(self.progress["tag"]), [])
            cfg = build_dqn_config(qan, self.meta, self.progress["tag"], self.steps_per_episode)
            with quiet_rllib():
                self.algo = cfg.build_algo()
        # The schedule the algorithm really runs (a resumed one keeps its checkpoint's).
        log(f"exploration: {describe_schedule(self.algo.config.epsilon)} "
            f"(explore_episodes {self.meta.explore_episodes}, fixed when the run started)")
        problem = learning_starts_problem(self.meta, self.steps_per_episode)
        if problem is not None:
            log(f"{'!' * 80}\nWARNING: {problem}\n{'!' * 80}")
        self._selector = None
        write_json(self.out / "config.json",
                   {"qan": qan.to_dict(), "meta": dataclasses.asdict(self.meta)})

    def _run_tag(self) -> str:
        return f"{self.progress['run']}-{os.getpid()}-{time.time_ns() % 10**6}"

    def _recover(self) -> list[int]:
        """On resume: the committed state after whatever crash. Puts a half-swapped checkpoint/
        or controller folder back, reads the progress committed with the checkpoint, drops the
        Parquet parts of later (uncommitted) commits and checks that the committed rows agree
        with the progress. Returns the global episode indices the log holds (for the counter)."""
        for name in ("checkpoint", "controller", "controller_last"):
            recover_dir(self.out / name)
        inside = self.out / "checkpoint" / PROGRESS_IN_CHECKPOINT
        legacy = self.out / "progress.json"
        if not (self.out / "checkpoint").is_dir() or not (inside.exists() or legacy.exists()):
            raise FileNotFoundError(f"--resume: no committed checkpoint/ under {str(self.out)!r} "
                                    "(the run stopped before its first commit, or this is not a "
                                    "run folder). Start without --resume, or pass the --out of "
                                    "the interrupted run.")
        fix = "Restore the run folder from a copy, or start a new --out."
        self.progress.update(read_json(inside if inside.exists() else legacy, "the run's "
                                       "committed progress", fix))
        steps = self.out / "steps"
        for part in sorted(steps.glob("part-*.parquet")) if steps.is_dir() else []:
            commit = _part_commit(part)
            if commit is not None and commit >= self.progress.get("commits", 0):
                part.unlink()  # written, but its commit never completed: its episodes rerun
                self.log(f"resume: dropped {part.name} (not committed; its episodes run again)")
        for tmp in steps.glob("*.tmp") if steps.is_dir() else []:
            tmp.unlink()
        rows = read_parts(steps).select(["episode", "global_episode", "truncated"]).to_pylist()
        full = sorted({r["episode"] for r in rows if r["episode"] is not None})
        if full != list(range(self.progress["episodes"])):
            raise ValueError(
                f"--resume: the Parquet log in {str(steps)!r} holds {len(full)} full episodes "
                f"but the committed progress says {self.progress['episodes']}; they must agree "
                f"(rows lost or added outside the run). {fix}")
        indices = [r["global_episode"] for r in rows if r["global_episode"] is not None]
        per_episode = {(r["episode"], r["global_episode"]) for r in rows
                       if r["global_episode"] is not None}
        seen = [g for _, g in per_episode]
        if len(seen) != len(set(seen)):
            dup = sorted({g for g in seen if seen.count(g) > 1})
            raise ValueError(f"--resume: the Parquet log in {str(steps)!r} holds global "
                             f"episodes {dup[:5]} twice; each must appear once. {fix}")
        return sorted(set(indices))

    def _check_folder(self) -> None:
        """A run whose folder (or its config.json) disappeared must stop, not recreate it."""
        if not (self.out / "config.json").exists():
            raise FileNotFoundError(
                f"the run folder {str(self.out)!r} (or its config.json) disappeared during the "
                "run; it must stay in place until the run ends. Nothing more was written; "
                "restore it and --resume, or start a new --out.")

    # --- the loop ------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> dict[str, Any]:
        """Meta-train until `until` episodes are done in all (default meta.episodes), then save
        and export. A loop bound only: the exploration schedule was fixed when the run started,
        so training in chunks (train(until=4), train(until=8), ...) explores as one run does."""
        target = self.meta.episodes if until is None else until
        if not isinstance(target, int) or target < 1:
            raise ValueError(f"`until` is {target!r}; it must be an integer >= 1 (the total "
                             "episodes to reach). Try train(until=meta.episodes).")
        self._target = target
        start_eps, t0 = self.progress["episodes"], time.time()
        members = (f" x {self.meta.population} members" if self.meta.population > 1 else "")
        ratio, batch = population_learner(self.meta)
        self.log(f"meta-training: {target} episodes of {self.steps_per_episode} control steps on "
                 f"{self.meta.num_actors} trainer actors{members} (DQN: replay ratio {ratio:g}, "
                 f"batch {batch}) -> {self.out}")
        result: dict[str, Any] = {}
        while self.progress["episodes"] < target:
            if INTERRUPTED.is_set():  # an interrupt whose KeyboardInterrupt was swallowed
                raise KeyboardInterrupt
            result = self.algo.train()
            self.progress["iterations"] += 1
            finished = self.drain()
            if finished:
                before = self.progress["episodes"]
                self._flush(finished, result, start_eps, t0)
                every = self.meta.select_every
                if every and before // every != self.progress["episodes"] // every:
                    self.select()
                self.save()
        self.save()
        self.export_controller()
        return result

    # --- model selection -----------------------------------------------------------------------
    def select(self) -> float:
        """Greedy controller on the selection seeds (on a trainer actor, where the data lives);
        keep it as controller/ if its mean final val accuracy is the best so far."""
        import ray

        from qan_ray.actors import ActorResources, start_trainer_actor

        net, spec = self._current_controller()
        if self._selector is None:  # 0 CPUs: it runs only while the trainers wait for it
            self._selector = start_trainer_actor(
                self.qan.replace(mm_coef=0.0, lr_init_range=None).to_dict(),
                ActorResources(0.0, self.meta.gpus_per_actor))
        seeds = [selection_seed(i) for i in range(self.meta.select_seeds)]
        accs = ray.get(self._selector.greedy_final_accuracy.remote(
            {k: v.clone() for k, v in net.state_dict().items()}, spec.to_dict(), seeds))
        score = sum(accs) / len(accs)
        best = self.progress.get("best")
        if best is None or score > best["score"]:
            self.progress["best"] = {"score": score, "episode": self.progress["episodes"]}
            spec.provenance["selection"] = self.progress["best"]
            self._save_controller(net, spec, "controller")
        b = self.progress["best"]
        self.log(f"selection after episode {self.progress['episodes']}: greedy val acc "
                 f"{score:.4f} on {len(seeds)} selection seeds (best {b['score']:.4f} after "
                 f"episode {b['episode']})")
        return score

    def drain(self) -> list[list[dict[str, Any]]]:
        from qan_ray.actors import drain_finished_episodes

        per_runner = self.algo.env_runner_group.foreach_env_runner(
            drain_finished_episodes, local_env_runner=False)
        return [ep for eps in per_runner for ep in eps]

    def _flush(self, episodes, result, start_eps: int, t0: float) -> None:
        """Number the finished episodes and write them as the next commit's Parquet part (the
        commit itself completes in `save`). A truncated (cut) episode is logged, flagged, and
        not counted."""
        self._check_folder()
        rows = []
        for ep_rows in episodes:
            if any(r.get("truncated") for r in ep_rows):
                self.progress["truncated"] = self.progress.get("truncated", 0) + 1
                rows.extend({**r, "episode": None, "run": self.progress["run"]} for r in ep_rows)
                last = ep_rows[-1]
                why = (f"trainer actor {last.get('actor')} died and was replaced"
                       if last.get("cut") != "generation" else
                       "its population's generation ended (a member's earlier episode ended "
                       "early and this one started on the same task)")
                self.log(f"episode cut after {len(ep_rows) - 1} control steps: {why}; "
                         f"TRUNCATED, not counted (global episode {last.get('global_episode')}, "
                         f"seed {last.get('seed')})")
                continue
            ep = self.progress["episodes"]
            self.progress["episodes"] += 1
            for r in ep_rows:
                rows.append({**r, "episode": ep, "run": self.progress["run"]})
            self._print_episode(ep, ep_rows, start_eps, t0)
        commit = self.progress.get("commits", 0)
        append_parts(self.out / "steps", rows, name=f"c{commit:06d}")
        self.progress["commits"] = commit + 1
        fault_point("after-parquet")

    def _print_episode(self, ep: int, rows, start_eps: int, t0: float) -> None:
        done = self.progress["episodes"] - start_eps
        target = getattr(self, "_target", self.meta.episodes)
        left = target - self.progress["episodes"]
        eta = (time.time() - t0) / max(1, done) * max(0, left)
        lrs = [r["lr"] for r in rows if r.get("lr") is not None]
        ret = sum(r["reward"] for r in rows)
        diverged = any(r.get("diverged") for r in rows)
        rescued = [int(r.get("step") or 0) for r in rows if r.get("rescued")]
        acc = rows[-1].get("val_accuracy") or 0.0
        self.log(f"episode {ep + 1:>4}/{target}  return {ret:8.3f}  val acc "
                 f"{acc:6.3f}  lr {lrs[0]:.3g} -> min {min(lrs):.3g} max {max(lrs):.3g} final "
                 f"{lrs[-1]:.3g}{'  DIVERGED' if diverged else ''}"
                 f"{f'  RESCUED at step {rescued}' if rescued else ''}  ETA {eta:5.0f}s"
                 f"{f'  [{task}]' if self.qan.tasks and (task := rows[-1].get('task')) else ''}")

    # --- outputs -------------------------------------------------------------------------------
    def save(self) -> None:
        """Commit: checkpoint + progress into checkpoint.tmp/, swapped in for checkpoint/ (the
        commit point), then the progress.json copy."""
        self._check_folder()
        tmp = self.out / "checkpoint.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.algo.save_to_path(str(tmp.resolve()))
        write_json(tmp / PROGRESS_IN_CHECKPOINT, self.progress)
        fault_point("after-checkpoint")
        swap_dir(tmp, self.out / "checkpoint")
        fault_point("after-swap")
        write_json(self.out / "progress.json", self.progress)

    def _save_controller(self, net, spec, name: str) -> Path:
        """Controller folder `name` replaced as a whole (written to name.tmp, then swapped)."""
        from policies.qnet import Controller

        tmp = self.out / f"{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        Controller(net, spec).save(tmp)
        fault_point("export")
        return swap_dir(tmp, self.out / name)

    def _current_controller(self):
        """The learner's current Q-network as a plain nn.Sequential, and its ControllerSpec."""
        from ray.rllib.core import DEFAULT_MODULE_ID

        from policies.qnet import export_qnet, plain_qnet
        from qan_ray.contract import ObservationSpec, spec_for

        state = self.algo.get_module(DEFAULT_MODULE_ID).get_state()
        net = plain_qnet(self.obs_size, tuple(self.meta.hidden), self.qan.num_actions)
        net.load_state_dict(export_qnet(state))
        dqn = dqn_progress(self.algo, self.meta.learning_starts)
        ratio, batch = population_learner(self.meta)
        dqn = {**dqn, "replay_ratio": ratio, "train_batch_size": batch}
        spec = spec_for(self.qan, self.meta.hidden, {
            "meta": dataclasses.asdict(self.meta), "episodes": self.progress["episodes"],
            "dqn": dqn, **({} if dqn["updated"] else {"warning": never_updated_message(dqn)}),
            "commit": _git_commit(),
            "command": " ".join(["qan", *sys.argv[1:]]) if sys.argv else "",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        spec.check_fits(ObservationSpec.from_dict(self.observation), "the trainer actors' task")
        return net, spec

    def export_controller(self) -> Path:
        """controller/ = the last Q-network, or with --select-every the best selected one
        (the last then goes to controller_last/)."""
        net, spec = self._current_controller()
        selecting = bool(self.meta.select_every) and "best" in self.progress
        folder = self._save_controller(net, spec,
                                       "controller_last" if selecting else "controller")
        if selecting:
            folder = self.out / "controller"
        self.updated = bool(spec.provenance["dqn"]["updated"])
        if not self.updated:
            self.log(f"{'!' * 80}\nWARNING: {folder}: {spec.provenance['warning']} (recorded in "
                     f"its spec.json provenance)\n{'!' * 80}")
        try:
            from qan_ray.plots import plot_learning_curve

            plot_learning_curve(read_parts(self.out / "steps"), self.out / "learning_curve.png")
        except Exception as err:  # noqa: BLE001 - a figure must never lose a trained controller
            self.log(f"(learning-curve figure skipped: {err})")
        return folder

    def stop(self) -> None:
        import ray

        for actor in (self._selector, self._counter):
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - already gone is fine
                    pass
        self._selector = self._counter = None
        self.algo.stop()


# --- CLI -------------------------------------------------------------------------------------
def add_meta_arguments(p: argparse.ArgumentParser) -> None:
    """MetaConfig 1:1 (dest meta_<field>; the seed and Q-net widths get their own flag names so
    they do not clash with the task's --seed and --hidden)."""
    from qan_ray.config import add_dataclass_arguments

    add_dataclass_arguments(p, MetaConfig, "meta-training (MetaConfig)", dest_prefix="meta_",
                            flags={"seed": "--meta-seed", "hidden": "--q-hidden"})


def meta_from_args(args: argparse.Namespace) -> MetaConfig:
    given = {f.name: getattr(args, f"meta_{f.name}") for f in dataclasses.fields(MetaConfig)
             if getattr(args, f"meta_{f.name}", None) is not None}
    return MetaConfig(**given).validate()


def configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (checkpoint, controller, logs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--preset", default=None,
                   help="alias of --task for the paper presets (paper-mnist-lr, ...)")
    add_meta_arguments(p)
    add_config_arguments(p)


def run_train(args: argparse.Namespace) -> int:
    if args.preset:
        args.task = args.preset
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out is {str(out)!r}, which is a file; it must be a run folder. "
                         "Pass a folder, e.g. --out runs/train.")
    if args.resume:
        saved = _read_config(out / "config.json")
        qan = from_dict(saved["qan"])
        meta = MetaConfig(**{**saved["meta"], "hidden": tuple(saved["meta"]["hidden"])})
        horizon = getattr(args, "meta_explore_episodes", None)
        if horizon is not None and horizon != meta.explore_episodes:
            raise ValueError(f"--explore-episodes is {horizon} but the run in {str(out)!r} "
                             f"explores over {meta.explore_episodes} episodes; the schedule is "
                             "fixed when a run starts. Drop --explore-episodes to resume, or "
                             "start a new --out.")
        if args.meta_episodes and args.meta_episodes != meta.episodes:
            print(f"resume: --episodes {args.meta_episodes} (was {meta.episodes}) changes only "
                  "the loop bound; the exploration schedule stays that of the original run.")
            meta = dataclasses.replace(meta, episodes=args.meta_episodes)
    else:
        qan = config_from_args(args)
        meta = meta_from_args(args)
    import ray

    from qan_ray.records import writable_dir

    writable_dir(out, "--out")
    start = time.time()
    ours = not ray.is_initialized()  # the command's own Ray ends with it
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _terminate(signum, frame):  # SIGINT/SIGTERM: export, hint, Ray shut down
        INTERRUPTED.set()  # kept even if the KeyboardInterrupt below is swallowed somewhere
        raise KeyboardInterrupt

    trainer = None
    INTERRUPTED.clear()
    try:
        if ours:  # before the handlers: ray.init replaces SIGTERM's (it would abort the driver)
            ray.init(namespace="qan", log_to_driver=False)  # RAY_ADDRESS joins a cluster
        if threading_main():
            signal.signal(signal.SIGINT, _terminate)
            sigterm_as_sigint()
        trainer = MetaTrainer(qan, meta, out, resume=args.resume)
        try:
            trainer.train()
        except KeyboardInterrupt:
            return _interrupted(trainer, out)
        untrained = ("" if getattr(trainer, "updated", True) else
                     " (NEVER UPDATED: an untrained network, see the warning above)")
        print(f"done in {time.time() - start:.0f}s: controller {out / 'controller'}{untrained}, "
              f"log {out / 'steps'}, checkpoint {out / 'checkpoint'}, figure "
              f"{out / 'learning_curve.png'}")
        return 0
    except KeyboardInterrupt:
        if trainer is not None:  # a second Ctrl-C while the first one was being handled
            return _interrupted(trainer, out, again=True)
        print(f"qan train: interrupted while starting (Ray and the trainer actors); nothing "
              f"was trained. Run the same command again{' with --resume' if args.resume else ''}"
              ".", file=sys.stderr)
        return 130
    finally:
        if threading_main():
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if trainer is not None:
            try:
                trainer.stop()
            except Exception:  # noqa: BLE001 - shutting down after an interrupt
                pass
        if ours and ray.is_initialized():
            ray.shutdown()


INTERRUPTED = threading.Event()
"""Set by `qan train`'s SIGINT/SIGTERM handler; the training loop stops at the next iteration."""


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupted(trainer: MetaTrainer, out: Path, again: bool = False) -> int:
    """Ctrl-C / SIGTERM during `qan train`: export the learner's current controller (further
    interrupts are ignored meanwhile), say what is committed and the command that continues;
    exit status 130."""
    p = trainer.progress
    if threading_main():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the export
    exported = "not exported (a second interrupt)" if again else None
    if exported is None:
        try:
            folder = trainer.export_controller()
            exported = f"the current controller is in {folder}"
        except Exception as err:  # noqa: BLE001 - report, never hide the interrupt
            exported = f"the controller could not be exported ({type(err).__name__}: {err})"
    if not p.get("commits", 0):
        print(f"qan train: interrupted before the first commit ({p['episodes']} episodes "
              f"finished, none committed); {exported}. Start again with the same command "
              "(the run folder holds no committed episodes).", file=sys.stderr)
        return 130
    print(f"qan train: interrupted after {p['episodes']} committed episodes (commit "
          f"{p.get('commits', 0)}); {exported}. Episodes that were running are not logged and "
          f"run again on resume. Continue with: qan train --out {out} --resume",
          file=sys.stderr)
    return 130

