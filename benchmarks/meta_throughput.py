"""Claim: meta-training on the generalist distribution with populations (each trainer actor
trains one drawn task as K networks at once, `qan train --population K`) completes >= 10x the
episodes per hour of the single-network run on the same machine and actors.

Evidence: the real `qan train` path (MetaTrainer: RLlib DQN over Ray trainer actors) on the
shipped generalist's task distribution and control problem (policies/builtin/PROVENANCE.md: tasks
generalist minus cnn2d and mnist1d-mlp, cosine corrections x0.1..x2, log_loss, guard on), run
side by side in one process, in alternating rounds:
- single: --population 1, 2 trainer actors, the shipped run's learner (replay ratio 16, batch 32);
- population: --population K, 2 trainer actors, the same learner (replay ratio 16, batch 32);
- population, population learner: --population K with the learner settings the population
  defaults to (MetaConfig: replay ratio and batch for K > 1).
Each arm meta-trains from scratch for about --budget seconds (in chunks of one episode per
member and actor); the time counted is `train()` (sampling, learning, logging, checkpoints), not
the algorithm's build. Episodes per hour = full episodes / that time (episodes cut at a
generation's end are logged and not counted). On a machine other jobs share, wall time follows
their load, so the script also counts the CPU seconds of the run's own processes (the driver,
where the DQN learner runs, the EnvRunners and the trainer actors; Linux /proc) and reports
episodes per CPU hour, which the other jobs move much less. Also measured, in one process and
thread: the seconds of one control step of one network and of K networks on tasks drawn from the
distribution (what populations can save before RLlib, the actors and the learner).

    python benchmarks/meta_throughput.py                  # the full run (appends its lines to
                                                          # results/population_speed.md)
    python benchmarks/meta_throughput.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "meta_throughput.md"
SPEED = Path(__file__).parent / "results" / "population_speed.md"
LINE = "meta_episodes_per_hour_speedup"

# The shipped generalist's control problem (policies/builtin/PROVENANCE.md).
GENERALIST = {"tasks": ("generalist",), "holdout": ("cnn2d", "mnist1d-mlp"),
              "lr_schedule": "cosine", "reward": "log_loss",
              "lr_factors": (0.1, 0.5, 0.9, 1.0, 1.1, 2.0)}


def _timer(result: dict, *names: str) -> float:
    timers = result.get("timers", {})
    for name in names:
        if name in timers:
            value = timers[name]
            return float(value if not isinstance(value, dict) else value.get("mean", 0.0))
    return float("nan")


def run_arm(name: str, population: int, budget: float, intensity: float, batch: int,
            seed: int, log=print) -> dict:
    """Meta-train from scratch for about `budget` seconds of `train()` (in chunks of one round
    of episodes); episodes per hour of the time spent in train()."""
    from qan_ray.distribution import load_config
    from qan_ray.meta import MetaConfig, MetaTrainer

    qan = load_config(GENERALIST)
    chunk = 2 * population  # one episode per member of both actors
    meta = MetaConfig(episodes=10**6, num_actors=2, population=population,
                      training_intensity=intensity, train_batch_size=batch, seed=seed,
                      select_every=0, explore_episodes=400)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f"qan-meta-{population}-") as out:
        t0 = time.perf_counter()
        mt = MetaTrainer(qan, meta, Path(out) / "run", log=lines.append)
        built = time.perf_counter() - t0
        seconds = 0.0
        try:
            pids = run_pids(mt)
            cpu0 = cpu_now(pids)
            while seconds < budget:
                t1 = time.perf_counter()
                result = mt.train(until=mt.progress["episodes"] + chunk)
                seconds += time.perf_counter() - t1
            cpu = cpu_now(pids) - cpu0
            done = mt.progress["episodes"]
            cut = mt.progress.get("truncated", 0)
            sampled = result["env_runners"]["num_env_steps_sampled_lifetime"]
            trained = dqn_trained(mt.algo)
        finally:
            mt.stop()
    tasks = [t for t in lines if t.startswith("episode ")]
    row = {"arm": name, "population": population, "intensity": intensity, "batch": batch,
           "episodes": done, "cut": cut, "seconds": seconds, "build_s": built,
           "episodes_per_hour": 3600.0 * done / seconds, "cpu_s": cpu,
           "episodes_per_cpu_hour": 3600.0 * done / cpu,
           "steps_per_hour": 3600.0 * sampled / seconds,
           "trained_per_hour": 3600.0 * trained / seconds, "logged": len(tasks),
           "load": os.getloadavg()[0]}
    log(f"  {name:<24} K={population:<3} ratio {intensity:>5.3g} batch {batch:>4}: {done} "
        f"episodes ({cut} cut) in {seconds:6.1f} s = {row['episodes_per_hour']:7.0f} episodes/h,"
        f" {row['steps_per_hour']:7.0f} control steps/h, "
        f"{row['episodes_per_cpu_hour']:7.0f} episodes per CPU hour (build {built:.0f} s, load "
        f"{os.getloadavg()[0]:.1f})", flush=True)
    return row


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pids(mt) -> list[int]:
    """The processes of a run besides the driver: its EnvRunners and their trainer actors."""
    import ray

    def pids(er):
        env = er.env.unwrapped  # one ActorVectorEnv, or a gymnasium vector env of ActorEnvs
        actors = [e.unwrapped._actor for e in getattr(env, "envs", [env])]
        return [os.getpid(), *ray.get([a.__ray_call__.remote(lambda _: os.getpid())
                                       for a in actors])]

    groups = mt.algo.env_runner_group.foreach_env_runner(pids, local_env_runner=False)
    found = [pid for group in groups for pid in group]
    if len(found) != 2 * mt.meta.num_actors:
        raise RuntimeError(f"found the processes {found} of {mt.meta.num_actors} EnvRunners and "
                           "their trainer actors; expected two per actor.")
    return found


def cpu_now(pids: list[int]) -> float:
    """CPU seconds so far of the driver (the DQN learner runs in it) and `pids`."""
    driver = os.times()
    return driver.user + driver.system + sum(_cpu_seconds(p) for p in pids)


def dqn_trained(algo) -> float:
    from qan_ray.meta import dqn_progress

    return float(dqn_progress(algo, 0)["trained_transitions"])


def env_bound(k: int, n_tasks: int, reps: int = 2, log=print) -> list[dict]:
    """Per task drawn from the distribution (seeds 7,000,000 + j): the seconds of one control
    step (one epoch) of one network (TargetTrainingEnv, what a single-network actor runs) and of K
    networks (PopulationVectorEnv), each the fastest of `reps` steps after a warm-up step, in the
    same process and thread. K x single / population is what populations can save on that task
    before RLlib, the actors and the learner."""
    import numpy as np
    import torch

    from qan_ray.env import TargetTrainingEnv
    from qan_ray.vector_env import PopulationVectorEnv

    torch.set_num_threads(1)
    rows = []
    for j in range(n_tasks):
        seed = 7_000_000 + j
        env = TargetTrainingEnv(dict(GENERALIST))
        env.reset(seed=seed)
        keep = env.actions.keep_action
        venv = PopulationVectorEnv({**GENERALIST, "num_envs": k})
        venv.reset(seed=seed)
        assert venv.cfg.model == env.cfg.model and venv.cfg.batch_size == env.cfg.batch_size
        single, pop = [], []
        for _ in range(reps + 1):
            t = time.perf_counter()
            env.step(keep)
            single.append(time.perf_counter() - t)
            t = time.perf_counter()
            venv.step(np.full(k, keep))
            pop.append(time.perf_counter() - t)
        row = {"task": env.info_task if hasattr(env, "info_task") else describe_task(env.cfg),
               "steps": env.total_steps, "single_s": min(single[1:]), "population_s": min(pop[1:])}
        row["ratio"] = k * row["single_s"] / row["population_s"]
        log(f"  {row['task']:<44} {row['steps']:>3} steps: 1 network {row['single_s']:.3f} s, "
            f"{k} networks {row['population_s']:.3f} s per step = {row['ratio']:.2f}x", flush=True)
        rows.append(row)
    return rows


def describe_task(cfg) -> str:
    from qan_ray.distribution import describe

    return describe(cfg).rsplit(" lr", 1)[0]


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--population", type=int, default=16, help="K, members per trainer actor")
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds of train() per arm and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bound-tasks", type=int, default=12,
                   help="tasks drawn for the per-task step costs (0: skip)")
    p.add_argument("--quick", action="store_true", help="one round, few episodes (a smoke run)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.budget, args.bound_tasks = 1, 20.0, 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from qan_ray.meta import MetaConfig, population_learner

    k = args.population
    intensity_k, batch_k = population_learner(MetaConfig(population=k))
    arms = [("single", 1, 16.0, 32),
            ("population", k, 16.0, 32),
            ("population+its learner", k, intensity_k, batch_k)]
    print(f"per-task step costs, K = {k}:", flush=True)
    bound = env_bound(k, args.bound_tasks)
    ray.init(namespace="qan", log_to_driver=False, include_dashboard=False)
    rows: list[dict] = []
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for name, pop, intensity, batch in arms:
                rows.append(run_arm(name, pop, args.budget, intensity, batch, seed=r))
    finally:
        ray.shutdown()

    def per(name: str, key: str) -> tuple[float, float]:
        return mean_sd([x[key] for x in rows if x["arm"] == name])

    single, _ = per("single", "episodes_per_hour")
    single_cpu, _ = per("single", "episodes_per_cpu_hour")
    lines = [
        "# Meta-training throughput: populations over the generalist distribution",
        "",
        f"`python benchmarks/meta_throughput.py{' --quick' if args.quick else ''} --population "
        f"{k}` on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}, {args.rounds} alternating rounds, load average at the end "
        f"{os.getloadavg()[0]:.1f}. Every arm: 2 trainer actors, the shipped generalist's tasks "
        "and control problem, RLlib DQN from scratch.",
        "",
        "| arm | K | replay ratio | batch | episodes/h (mean +- sd) | control steps/h | "
        "samples trained/h | x single | episodes per CPU hour | x single |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, pop, intensity, batch in arms:
        eph, sd = per(name, "episodes_per_hour")
        sph, _ = per(name, "steps_per_hour")
        tph, _ = per(name, "trained_per_hour")
        epc, _ = per(name, "episodes_per_cpu_hour")
        lines.append(f"| {name} | {pop} | {intensity:.3g} | {batch} | {eph:.0f} +- {sd:.0f} | "
                     f"{sph:.0f} | {tph:.0f} | {eph / single:.2f} | {epc:.0f} | "
                     f"{epc / single_cpu:.2f} |")
    lines += ["", "Per run (load: the 1-minute load average when the arm ended):", "",
              "| arm | round | episodes | cut | seconds | CPU seconds | episodes/h | load |",
              "|---|---|---|---|---|---|---|---|"]
    for i, x in enumerate(rows):
        lines.append(f"| {x['arm']} | {i // len(arms) + 1} | {x['episodes']} | {x['cut']} | "
                     f"{x['seconds']:.1f} | {x['cpu_s']:.0f} | {x['episodes_per_hour']:.0f} | "
                     f"{x['load']:.1f} |")
    if bound:
        weighted = (sum(b["steps"] * k * b["single_s"] for b in bound)
                    / sum(b["steps"] * b["population_s"] for b in bound))
        lines += ["", f"Per-task step costs (one epoch; {len(bound)} tasks drawn from the "
                  "distribution, seeds 7,000,000 + j; fastest of 2 steps, 1 thread): what "
                  "populations can save before RLlib, the actors and the learner.", "",
                  "| task | steps | 1 network (s) | K networks (s) | K x 1 / K |",
                  "|---|---|---|---|---|"]
        lines += [f"| {b['task']} | {b['steps']} | {b['single_s']:.3f} | "
                  f"{b['population_s']:.3f} | {b['ratio']:.2f} |" for b in bound]
        lines += ["", f"Weighted by episode length (the mix's time): **{weighted:.2f}x** at "
                  f"K = {k}."]
    best = max(per(name, "episodes_per_hour")[0] for name, *_ in arms[1:])
    speedup = best / single
    lines += ["", f"{LINE}: {speedup:.2f}", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    if not args.quick:
        update_speed_file(speedup)


def update_speed_file(speedup: float) -> None:
    """Put `meta_episodes_per_hour_speedup: X` among population_speed.md's closing lines."""
    text = SPEED.read_text().rstrip("\n").split("\n")
    text = [t for t in text if not t.startswith(f"{LINE}:")]
    tail = [i for i, t in enumerate(text) if t and ":" in t and " " not in t.split(":")[0]]
    at = tail[0] if tail else len(text)
    text.insert(at, f"{LINE}: {speedup:.2f}")
    SPEED.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
