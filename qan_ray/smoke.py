"""`qan episode`: the QAN environment driven by a fixed-LR and a random controller, with their
episode returns and accuracies (no Ray, no learning: a smoke test of the environment).

Parsing its flags imports neither torch nor Ray (`run_episode` imports the environment).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qan_ray.config import add_config_arguments
from qan_ray.constants import run_seed
from qan_ray.distribution import config_from_args


def configure_episode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controllers", default="fixed,random",
                   help="comma-separated: fixed (keep the LR) | random (uniform actions)")
    p.add_argument("--episodes", type=int, default=2, help="episodes per controller")
    add_config_arguments(p)


def run_episode(args: argparse.Namespace) -> int:
    from qan_ray.env import TargetTrainingEnv, rollout

    cfg = config_from_args(args)
    env = TargetTrainingEnv(cfg)
    rng = np.random.default_rng(cfg.seed)
    controllers = {
        "fixed": lambda obs, info: env.actions.keep_action,
        "random": lambda obs, info: int(rng.integers(cfg.num_actions)),
    }
    names = [c.strip() for c in args.controllers.split(",") if c.strip()]
    unknown = [c for c in names if c not in controllers]
    if unknown:
        raise ValueError(f"--controllers names {unknown}; valid: {sorted(controllers)}.")
    print(f"task {cfg.task}: {env.total_steps} control steps of {cfg.control_interval} "
          f"mini-batches per episode, {cfg.num_actions} actions, obs size "
          f"{env.observation_space.shape[0]}, device {env.trainer.device}")
    print(f"{'controller':<10} {'episode':>7} {'return':>8} {'val acc':>8} {'test acc':>8} "
          f"{'final lr':>9} {'seconds':>8}")
    for name in names:
        for ep in range(args.episodes):
            start = time.perf_counter()
            recs = rollout(env, controllers[name], seed=run_seed(cfg.seed, ep))
            _, test_acc = env.trainer.evaluate("test")
            ret = sum(r["reward"] for r in recs)
            print(f"{name:<10} {ep:>7} {ret:>8.3f} {recs[-1]['val_accuracy']:>8.3f} "
                  f"{test_acc:>8.3f} {recs[-1]['lr']:>9.4g} {time.perf_counter() - start:>8.2f}")
    return 0
