"""`make demo` (the main job on the embedded default) and `qan episode`.

`make demo`: first the product as a user meets it: `qan compare` of the shipped controller
(`QANScheduler()`'s default, a generalist meta-trained on a task distribution) against ASHA, PBT
and FIFO in Ray Tune, on an embedded task it never trained on (the 2-D CNN on digits, a held-out
model family); then how a controller is made: a short `qan train` (RLlib DQN over 2 trainer
actors) on the embedded digits MLP and `qan evaluate` of the result against the baselines
(table + figures). Everything lands under runs/demo/. A few minutes on 2 CPUs.

`qan episode`: the QAN environment driven by a fixed-LR and a random controller, with their
episode returns and accuracies (no Ray, no learning: a smoke test of the environment).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qan_ray.config import add_config_arguments, config_from_args
from qan_ray.env import TargetTrainingEnv, keep_action, rollout


def configure_episode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controllers", default="fixed,random",
                   help="comma-separated: fixed (keep the LR) | random (uniform actions)")
    p.add_argument("--episodes", type=int, default=2, help="episodes per controller")
    add_config_arguments(p)


def run_episode(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    env = TargetTrainingEnv(cfg)
    rng = np.random.default_rng(cfg.seed)
    controllers = {
        "fixed": lambda obs, info: keep_action(cfg),
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
            recs = rollout(env, controllers[name], seed=cfg.seed + ep)
            _, test_acc = env.trainer.evaluate("test")
            ret = sum(r["reward"] for r in recs)
            print(f"{name:<10} {ep:>7} {ret:>8.3f} {recs[-1]['val_accuracy']:>8.3f} "
                  f"{test_acc:>8.3f} {recs[-1]['lr']:>9.4g} {time.perf_counter() - start:>8.2f}")
    return 0


DEMO_OUT = "runs/demo"


def demo_commands(out: str = DEMO_OUT) -> list[list[str]]:
    """The demo's steps, as `qan` argument lists (printed before they run). The trained
    controller acts once per epoch (35 mini-batches) from a random initial LR, as it will in Ray
    Tune, where trainables report once per epoch."""
    task = ["--task", "digits-mlp", "--control-interval", "35", "--lr-init-range", "0.001,1",
            "--lr-schedule", "cosine"]
    return [
        ["compare", "--task", "digits-cnn", "--schedulers", "qan,asha,pbt,fifo", "--seeds", "0",
         "--policy", "builtin", "--out", f"{out}/compare"],
        ["train", *task, "--episodes", "12", "--num-actors", "2", "--learning-starts", "32",
         "--out", f"{out}/train"],
        ["evaluate", "--controller", f"{out}/train", "--seeds", "3", "--out", f"{out}/evaluate"],
    ]


def main() -> int:
    import shutil
    import time

    from qan_ray.cli import main as cli_main

    shutil.rmtree(DEMO_OUT, ignore_errors=True)  # the demo's own folder only
    start = time.time()
    for argv in demo_commands():
        print(f"\n$ qan {' '.join(argv)}", flush=True)
        rc = cli_main(argv)
        if rc:
            return rc
    print(f"\ndemo done in {time.time() - start:.0f}s; outputs under {DEMO_OUT}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
