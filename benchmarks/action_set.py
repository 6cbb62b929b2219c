"""Question (issue: no dead trials): do actions that can rescue (a x0.1 cut) matter, next to the
x0.5..x2 set, once starts from too-high LRs are common in training; and what does the rescue
guard add on top?

Arms (each: `MetaTrainer` = RLlib DQN over 2 trainer actors on digits-mlp (SGD, momentum 0.9),
one decision per epoch, episodes from an LR drawn log-uniformly in [1e-4, 1] (the range a Tune
user searches), reward log_loss with gamma 0.95 on a cosine schedule, guard on in training,
--episodes per meta seed):
- old: actions x0.5 / x0.9 / keep / x1.1 / x2;
- new: x0.1 / x0.5 / x0.9 / keep / x1.1 / x2.
Evaluation: each greedy controller from start LRs 0.001, 0.01, 0.1, 0.5 and 1.0 on 3 evaluation
seeds (never seen in training), with the guard on and off. Reported: mean final val accuracy
(mean +- sd over meta seeds, each the mean over starts and evaluation seeds), dead runs (final
val accuracy within 5 points of chance), rescues, per arm and guard setting; and per start.
Nothing here is a held-out task: digits-mlp is in the training distribution (this chooses a
design, so it must not be judged on the held-out families).

    python benchmarks/action_set.py [--episodes 60] [--meta-seeds 2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results" / "action_set.md"
STARTS = (0.001, 0.01, 0.1, 0.5, 1.0)
ARMS = {"old x0.5..x2": (0.5, 0.9, 1.0, 1.1, 2.0),
        "new x0.1..x2": (0.1, 0.5, 0.9, 1.0, 1.1, 2.0)}


def _ms(xs) -> str:
    from qan_ray.summaries import mean_sd

    m, sd = mean_sd([x for x in xs if x is not None and math.isfinite(x)])
    return "-" if math.isnan(m) else f"{m:.4f} +- {sd:.4f}"


def main() -> None:
    import ray

    from policies.qnet import load_controller
    from qan_ray.config import from_dict
    from qan_ray.constants import is_dead
    from qan_ray.env import TargetTrainingEnv
    from qan_ray.evaluate import eval_seeds, run_controller
    from qan_ray.meta import MetaConfig, MetaTrainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--meta-seeds", type=int, default=2)
    p.add_argument("--eval-seeds", type=int, default=3)
    args = p.parse_args()
    base = from_dict(task="digits-mlp", control_interval=35, lr_init_range=(1e-4, 1.0),
                     lr_schedule="cosine", reward="log_loss", device="cpu")
    seeds = eval_seeds(args.eval_seeds)
    t0 = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="qan")
    rows = []
    for arm, factors in ARMS.items():
        cfg = base.replace(lr_factors=factors)
        for ms in range(args.meta_seeds):
            with tempfile.TemporaryDirectory() as tmp:
                meta = MetaConfig(episodes=args.episodes, num_actors=2, cpus_per_actor=0.9,
                                  gamma=0.95, seed=ms, learning_starts=32)
                mt = MetaTrainer(cfg.replace(seed=1000 * ms), meta, Path(tmp) / "run",
                                 log=lambda *_: None)
                mt.train()
                mt.export_controller()
                ctrl = load_controller(Path(tmp) / "run")
                mt.stop()
            for guard in (True, False):
                for start in STARTS:
                    env = TargetTrainingEnv(cfg.replace(lr_init_range=None, lr=start,
                                                        guard=guard))
                    for s in seeds:
                        recs = run_controller(env, ctrl, s)
                        rows.append({"arm": arm, "meta_seed": ms, "guard": guard,
                                     "start": start, "acc": recs[-1]["val_accuracy"],
                                     "dead": is_dead(recs[-1]["val_accuracy"]),
                                     "rescues": int(recs[-1].get("rescues", 0))})
            mine = [r for r in rows if r["arm"] == arm and r["meta_seed"] == ms and r["guard"]]
            print(f"[{arm}] meta seed {ms}: guard on: val acc "
                  f"{statistics.mean(r['acc'] for r in mine):.4f}, dead "
                  f"{sum(r['dead'] for r in mine)}/{len(mine)} ({time.time() - t0:.0f}s)",
                  flush=True)
    ray.shutdown()
    lines = ["# Action set and rescue guard (benchmarks/action_set.py)", "",
             f"digits-mlp (in the training distribution: a design choice is made here), one "
             f"decision per epoch, start LRs log-uniform in [1e-4, 1] in training, "
             f"{args.episodes} episodes x {args.meta_seeds} meta seeds per arm, greedy "
             f"evaluation from starts {list(STARTS)} x {args.eval_seeds} evaluation seeds; "
             f"{time.time() - t0:.0f}s on a 2-core CPU machine.", "",
             "| actions | guard | final val acc (mean over starts; sd over meta seeds) | dead "
             "runs | rescues |", "|---|---|---|---|---|"]
    for arm in ARMS:
        for guard in (True, False):
            rs = [r for r in rows if r["arm"] == arm and r["guard"] == guard]
            per_seed = [statistics.mean(r["acc"] for r in rs if r["meta_seed"] == m)
                        for m in range(args.meta_seeds)]
            lines.append(f"| {arm} | {'on' if guard else 'off'} | {_ms(per_seed)} | "
                         f"{sum(r['dead'] for r in rs)}/{len(rs)} | "
                         f"{sum(r['rescues'] for r in rs)} |")
    lines += ["", "Per start (final val acc, mean over meta and evaluation seeds; dead runs):", "",
              "| actions | guard | " + " | ".join(f"start {s:g}" for s in STARTS) + " |",
              "|---|---|" + "---|" * len(STARTS)]
    for arm in ARMS:
        for guard in (True, False):
            cells = []
            for start in STARTS:
                rs = [r for r in rows if r["arm"] == arm and r["guard"] == guard
                      and r["start"] == start]
                cells.append(f"{statistics.mean(r['acc'] for r in rs):.3f} "
                             f"({sum(r['dead'] for r in rs)} dead)")
            lines.append(f"| {arm} | {'on' if guard else 'off'} | " + " | ".join(cells) + " |")
    lines.append("")
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
