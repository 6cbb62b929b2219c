"""Question: does a black-box search over a two-parameter LR policy match (or beat) the DQN
controller on tasks neither saw? (The DAC replication of Daniel et al. used SMAC with 5,000
episodes; if a simple search wins, a learned state-dependent controller is not paying for itself.)

The policy family is what the DQN's `--lr-schedule cosine` actions can express, without state:
    lr(p) = lr0 * a * exp(s * p) * 0.5 * (1 + cos(pi * p)),   p = progress in [0, 1],
a start-LR scale `a` (log-uniform in [0.1, 10]) and a log-slope `s` (uniform in [-3, 3]) of the
correction; (a, s) = (1, 0) is plain cosine, always candidate 0.

Search (random search, seeded): every candidate runs on the same `--search-tasks` tasks drawn
from the training distribution (`generalist` minus the held-out families; seeds 2,000,000 + j,
which neither meta-training nor evaluation uses), each task as one population of all candidates
with the same init seed (qan_ray.control.run_schedules). Objective: mean final val accuracy
over the tasks. Budget: candidates x tasks episodes, reported next to the DQN's episodes.

Held-out evaluation: the held-out presets at one decision per epoch, from start LRs one decade
apart, `--seeds` evaluation seeds: cosine, the best searched policy and the DQN controller
(greedy, `--controller`), same trainer, same seeds. Writes benchmarks/results/blackbox_search.md
and a parquet of the raw numbers.

    python benchmarks/blackbox_search.py --controller runs/generalist/run
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np

from qan_ray.config import from_dict
from qan_ray.control import AdaptiveBaseline, run_schedules
from qan_ray.distribution import TASK_FIELDS, batches_per_epoch, sample_task
from qan_ray.evaluate import eval_seeds, run_controller
from qan_ray.records import write_table

RESULTS = Path(__file__).parent / "results"
SEARCH_SEED_BASE = 2_000_000


class CorrectedCosine(AdaptiveBaseline):
    """lr0 * a * exp(s * progress) * cosine(progress): a fixed correction curve on cosine."""

    def __init__(self, lr: float, a: float, s: float):
        super().__init__(lr)
        self.a, self.s = float(a), float(s)

    def update(self, trainer, info) -> float:
        p = trainer.progress
        return self.lr0 * self.a * math.exp(self.s * p) * 0.5 * (1.0 + math.cos(math.pi * p))


def candidates(n: int, seed: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    out = [(1.0, 0.0)]
    while len(out) < n:
        out.append((float(math.exp(rng.uniform(math.log(0.1), math.log(10.0)))),
                    float(rng.uniform(-3.0, 3.0))))
    return out


def eval_config(base: dict, task: str, lr: float):
    """A held-out preset with the controller's control problem, one decision per epoch."""
    cfg = from_dict({k: v for k, v in base.items()
                     if k not in TASK_FIELDS and k not in ("tasks", "holdout", "lr_init_range")},
                    task=task, lr=lr)
    return cfg.replace(control_interval=batches_per_epoch(cfg), mm_coef=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--controller", required=True, help="the DQN controller (qan train --out)")
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--search-tasks", type=int, default=6)
    p.add_argument("--heldout", default="digits-cnn,mnist1d-mlp")
    p.add_argument("--starts", default="0.003,0.03,0.3", help="start LRs (momentum SGD)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "blackbox_search.md"))
    args = p.parse_args()

    from policies.qnet import load_controller

    controller = load_controller(args.controller)
    base = dict(controller.spec.task)
    train_cfg = from_dict({**base, "lr_init_range": None})
    cands = candidates(args.candidates, args.seed)
    t0 = time.time()
    scores = np.zeros((len(cands), args.search_tasks))
    for j in range(args.search_tasks):
        task = sample_task(train_cfg, SEARCH_SEED_BASE + j).replace(lr_schedule="constant")
        members = [(CorrectedCosine(task.lr, a, s), task.lr, SEARCH_SEED_BASE + j)
                   for a, s in cands]
        records, _ = run_schedules(task, members)
        scores[:, j] = [r[-1]["val_accuracy"] for r in records]
        print(f"search task {j + 1}/{args.search_tasks} ({task.task}, {task.model}, "
              f"{task.optimizer}, lr {task.lr:.3g}, {task.epochs_per_episode:g} epochs): cosine "
              f"{scores[0, j]:.3f}, best {scores[:, j].max():.3f} ({time.time() - t0:.0f}s)",
              flush=True)
    mean = scores.mean(axis=1)
    best = int(np.argmax(mean))
    a_best, s_best = cands[best]
    print(f"best candidate {best}: a {a_best:.3g}, s {s_best:.2f}, mean {mean[best]:.4f} "
          f"(cosine {mean[0]:.4f})", flush=True)

    rows = []
    starts = [float(x) for x in args.starts.split(",")]
    for name in args.heldout.split(","):
        for lr in starts:
            cfg = eval_config(base, name, lr)
            seeds = eval_seeds(args.seeds)
            pol = [(CorrectedCosine(lr, 1.0, 0.0), lr, s) for s in seeds]
            pol += [(CorrectedCosine(lr, a_best, s_best), lr, s) for s in seeds]
            records, _ = run_schedules(cfg.replace(lr_schedule="constant"), pol)
            for i, rec in enumerate(records):
                rows.append({"task": name, "start_lr": lr, "seed": pol[i][2],
                             "method": "cosine" if i < len(seeds) else "searched",
                             "final_val_accuracy": rec[-1]["val_accuracy"]})
            from qan_ray.env import TargetTrainingEnv

            env = TargetTrainingEnv(cfg)
            controller.spec.check_fits(env.observer.spec, f"task {name!r}")
            for s in seeds:
                rec = run_controller(env, controller, s)
                rows.append({"task": name, "start_lr": lr, "seed": s, "method": "dqn",
                             "final_val_accuracy": rec[-1]["val_accuracy"]})
            print(f"{name} from {lr:g}: " + ", ".join(
                f"{m} {statistics.fmean(r['final_val_accuracy'] for r in rows if r['task'] == name and r['start_lr'] == lr and r['method'] == m):.4f}"  # noqa: E501
                for m in ("cosine", "searched", "dqn")), flush=True)
    wall = time.time() - t0

    def cell(task: str, lr: float, method: str) -> str:
        xs = [r["final_val_accuracy"] for r in rows
              if r["task"] == task and r["start_lr"] == lr and r["method"] == method]
        return f"{statistics.fmean(xs):.4f} +- {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"

    overall = {m: statistics.fmean(r["final_val_accuracy"] for r in rows if r["method"] == m)
               for m in ("cosine", "searched", "dqn")}
    lines = [
        "# Black-box search vs the DQN controller on held-out tasks", "",
        f"`python benchmarks/blackbox_search.py --controller {args.controller} --candidates "
        f"{args.candidates} --search-tasks {args.search_tasks} --seeds {args.seeds}`", "",
        f"Policy family: lr(p) = lr0 * a * exp(s p) * cosine(p); random search over "
        f"{len(cands)} candidates (candidate 0 = plain cosine) on {args.search_tasks} tasks "
        f"drawn from the controller's training distribution ({base.get('tasks')} minus "
        f"{base.get('holdout')}): {len(cands) * args.search_tasks} episodes, trained as one "
        f"population per task. The DQN controller's own meta-training used more episodes (its "
        f"PROVENANCE / training log). Wall time {wall:.0f} s on a busy 2-core CPU.", "",
        f"Best candidate: a = {a_best:.3g}, s = {s_best:.2f}: mean search-task val acc "
        f"{mean[best]:.4f} vs cosine {mean[0]:.4f}.", "",
        "## Held-out tasks (final val accuracy, mean +- sd over "
        f"{args.seeds} evaluation seeds)", "",
        "| task | start LR | cosine | searched policy | DQN controller |", "|---|---|---|---|---|"]
    for name in args.heldout.split(","):
        for lr in starts:
            lines.append(f"| {name} | {lr:g} | {cell(name, lr, 'cosine')} | "
                         f"{cell(name, lr, 'searched')} | {cell(name, lr, 'dqn')} |")
    verdict = ("the searched 2-parameter policy matches or beats the DQN"
               if overall["searched"] >= overall["dqn"] else
               "the DQN beats the searched 2-parameter policy")
    lines += ["", f"Mean over held-out tasks, starts and seeds: cosine {overall['cosine']:.4f}, "
              f"searched {overall['searched']:.4f}, DQN {overall['dqn']:.4f}: {verdict}.", ""]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    write_table(out.with_suffix(".parquet"), rows)
    write_table(out.with_name(out.stem + "_search.parquet"),
                [{"candidate": i, "a": a, "s": s, "task_index": j,
                  "final_val_accuracy": float(scores[i, j])}
                 for i, (a, s) in enumerate(cands) for j in range(args.search_tasks)])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
