"""Claim: QAN's wall-time overhead in `qan compare` over FIFO on the same trials is under 10%.

Evidence: `qan_ray.protocol.run_experiment` (the experiment `qan compare` runs) with QAN (the
shipped controller, one decision per epoch) and with FIFO, on the same task, search space, trial
configs (`BasicVariantGenerator(random_state=seed)`), resources and epoch budget. Both run the
same built-in trainable (`TargetTrainer`); QAN adds one observation per epoch (pooled weight
statistics on the trial's CPU), one control-channel round trip and one greedy Q-network pass on
the driver. The order of the two alternates per seed so drift hits both; a discarded warm-up
experiment of each absorbs Ray's start-up (QAN's per-experiment control-channel actor, about a
second to start, is counted in every QAN experiment). Reported: wall seconds per experiment,
mean +- sd over seeds, and qan_wall_vs_fifo = mean QAN wall / mean FIFO wall (per task and
overall).

    python benchmarks/qan_overhead.py [--seeds 3] [--tasks digits-mlp,digits-mlp-wide]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results" / "qan_overhead.md"
TASKS = {  # name -> QANConfig fields of the trainable
    "digits-mlp": {"task": "digits-mlp"},
    "digits-mlp-wide": {"task": "digits-mlp", "hidden": (512, 512)},  # 300k parameters
}


def main() -> None:
    import ray

    from qan_ray.protocol import Protocol, run_experiment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    walls: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as storage:
        for task in args.tasks.split(","):
            proto = Protocol(task_config=dict(TASKS[task]), samples=args.samples,
                             epochs=args.epochs)
            for name in ("fifo", "qan"):  # warm-up: one-time costs, not counted
                run_experiment(name, proto, 999, storage, log=lambda *_: None)
            walls[task] = {"qan": [], "fifo": []}
            for seed in range(args.seeds):
                order = ("qan", "fifo") if seed % 2 == 0 else ("fifo", "qan")
                for name in order:
                    out = run_experiment(name, proto, seed, storage)
                    walls[task][name].append(out["summary"]["wall_s"])
    ray.shutdown()

    def ms(xs):
        return f"{statistics.mean(xs):.2f} +- {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}"

    lines = ["# QAN's wall-time overhead over FIFO (benchmarks/qan_overhead.py)", "",
             f"{args.samples} trials x {args.epochs} epochs per experiment, 2 concurrent trials "
             f"x 1 CPU, {args.seeds} seeds (trial configs fixed by the seed), 2-core CPU "
             "machine, shipped controller (one decision per epoch). Ray's start-up is paid in an "
             "uncounted warm-up; QAN's per-experiment channel actor is counted.", "",
             "| task | FIFO wall s | QAN wall s | QAN / FIFO |", "|---|---|---|---|"]
    ratios = []
    for task, w in walls.items():
        ratio = statistics.mean(w["qan"]) / statistics.mean(w["fifo"])
        ratios.append(ratio)
        lines.append(f"| {task} | {ms(w['fifo'])} | {ms(w['qan'])} | {ratio:.3f} |")
    overall = statistics.mean(ratios)
    lines += ["", f"Goal: QAN within 10% of FIFO: {'met' if overall <= 1.10 else 'NOT met'}.",
              "", f"qan_wall_vs_fifo: {overall:.3f}", ""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
