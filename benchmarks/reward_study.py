"""Question (issue: a reward and an action set that make the right thing pay): which reward and
which action parameterisation should be the default?

Diagnosis under test: a per-step training-loss reward with discount < 1 (`log_loss`, gamma 0.95,
the old default) favours decaying the LR early (the short-horizon bias of Wu et al., ICLR 2018).

Arms (each: `MetaTrainer` = RLlib DQN over 2 trainer actors on digits-mlp, one decision per epoch,
episodes from an LR drawn log-uniformly in [0.001, 1], --episodes per meta seed):
- log_loss / gamma 0.95 / constant (the old default);
- final_val / gamma 1 / constant: the episode's validation log-loss improvement, paid at its end;
- time_to_target / gamma 1 / constant;
- log_loss / gamma 0.95 / cosine: actions correct a cosine decay (keep = plain cosine);
- final_val / gamma 1 / cosine.
Evaluation: the greedy controller from three initial LRs across 3 decades (0.003, 0.03, 0.3) on
3 evaluation seeds each (never seen in training), against fixed-LR and cosine from the same
start, on the same trainer. Reported: final val accuracy, mean +- sd over meta seeds (each the
mean over starts and evaluation seeds), the regret against the best of fixed/cosine per start,
and the mean log10(final LR / initial LR) (how much the controller decays).

    python benchmarks/reward_study.py [--episodes 40] [--meta-seeds 2]
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

RESULTS = Path(__file__).parent / "results" / "reward_study.md"
STARTS = (0.003, 0.03, 0.3)
ARMS = {  # name -> (reward, gamma, lr_schedule)
    "log_loss g0.95 constant": ("log_loss", 0.95, "constant"),
    "final_val g1 constant": ("final_val", 1.0, "constant"),
    "time_to_target g1 constant": ("time_to_target", 1.0, "constant"),
    "log_loss g0.95 cosine": ("log_loss", 0.95, "cosine"),
    "final_val g1 cosine": ("final_val", 1.0, "cosine"),
}


def _ms(xs) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"


def main() -> None:
    import ray

    from policies.qnet import load_controller
    from qan_ray.config import from_dict
    from qan_ray.env import TargetTrainingEnv
    from qan_ray.evaluate import eval_seeds, run_controller, run_schedule
    from qan_ray.meta import MetaConfig, MetaTrainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--meta-seeds", type=int, default=2)
    p.add_argument("--eval-seeds", type=int, default=3)
    p.add_argument("--arms", default=",".join(ARMS))
    args = p.parse_args()
    base = from_dict(task="digits-mlp", control_interval=35, lr_init_range=(0.001, 1.0),
                     target_accuracy=0.95, device="cpu")
    seeds = eval_seeds(args.eval_seeds)
    t0 = time.time()
    baselines: dict[tuple[float, str], float] = {}
    env = TargetTrainingEnv(base.replace(lr_init_range=None))
    for start in STARTS:
        for name in ("fixed", "cosine"):
            accs = [run_schedule(env, name, start, s)[-1]["val_accuracy"] for s in seeds]
            baselines[(start, name)] = statistics.mean(accs)
    print(f"baselines: {baselines} ({time.time() - t0:.0f}s)", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="qan")
    rows = []
    for arm in args.arms.split(","):
        reward, gamma, schedule = ARMS[arm]
        cfg = base.replace(reward=reward, lr_schedule=schedule)
        for ms in range(args.meta_seeds):
            with tempfile.TemporaryDirectory() as tmp:
                meta = MetaConfig(episodes=args.episodes, num_actors=2, cpus_per_actor=0.9,
                                  gamma=gamma, seed=ms, learning_starts=32)
                mt = MetaTrainer(cfg.replace(seed=1000 * ms), meta, Path(tmp) / "run",
                                 log=lambda *_: None)
                mt.train()
                mt.export_controller()
                ctrl = load_controller(Path(tmp) / "run")
                mt.stop()
            accs, regrets, decays = [], [], []
            for start in STARTS:
                env = TargetTrainingEnv(cfg.replace(lr_init_range=None, lr=start))
                for s in seeds:
                    recs = run_controller(env, ctrl, s)
                    accs.append(recs[-1]["val_accuracy"])
                    decays.append(math.log10(recs[-1]["lr"] / start))
                best = max(baselines[(start, "fixed")], baselines[(start, "cosine")])
                regrets.append(best - statistics.mean(accs[-len(seeds):]))
            rows.append({"arm": arm, "meta_seed": ms, "acc": statistics.mean(accs),
                         "regret": statistics.mean(regrets), "decay": statistics.mean(decays)})
            print(f"[{arm}] meta seed {ms}: val acc {rows[-1]['acc']:.4f}, regret "
                  f"{rows[-1]['regret']:+.4f}, log10 final/initial LR {rows[-1]['decay']:+.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    ray.shutdown()
    lines = ["# Reward and action-set study (benchmarks/reward_study.py)", "",
             f"digits-mlp, one decision per epoch, {args.episodes} episodes x "
             f"{args.meta_seeds} meta seeds per arm, greedy evaluation from initial LRs "
             f"{list(STARTS)} x {args.eval_seeds} evaluation seeds; {time.time() - t0:.0f}s on "
             "a 2-core CPU machine.", "",
             "Baselines from the same starts (mean final val acc over the evaluation seeds): " +
             ", ".join(f"{n}@{s:g} {v:.4f}" for (s, n), v in baselines.items()), "",
             "| arm (reward, gamma, schedule) | final val acc | regret vs best of fixed/cosine "
             "per start | log10(final LR / start) |", "|---|---|---|---|"]
    for arm in args.arms.split(","):
        rs = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | {_ms([r['acc'] for r in rs])} | "
                     f"{_ms([r['regret'] for r in rs])} | {_ms([r['decay'] for r in rs])} |")
    lines.append("")
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
