"""Claim: one observation of a 1M-parameter network costs <= 10 ms on one CPU thread.

Evidence: milliseconds per observation (weight statistics + training signals, the whole vector a
controller sees) for networks of about 5k, 200k, 1M and 10M parameters (MLPs) plus two CNNs
(LeNet, WRN-16-4), "before" and "after":
- before: the per-layer vector of qan-ray up to commit BASE_COMMIT (192 statistics per layer,
  concatenated; one full sort per group set), loaded from git history;
- after: `qan_ray.contract.Observer` (pooled by depth, stratified subsample, raw-moment stats).
Each cell is the median over `--calls` calls after a warm-up (3 calls for the old vector above 1M
parameters, where one call takes seconds), per model seed; we report mean and sd over `--seeds`
model inits. Both run in this process with torch.set_num_threads(1).

    python benchmarks/observation_cost.py [--seeds 3] [--calls 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch

from qan_ray.contract import ObservationSpec, Observer
from qan_ray.models import MLP, LeNet, WideResNet

RESULTS = Path(__file__).parent / "results" / "observation_cost.md"
BASE_COMMIT = "2e5ce86"
MODELS = {  # name -> (factory, what it stands for)
    "mlp-5k": (lambda: MLP(64, (64,)), "the digits MLP"),
    "mlp-200k": (lambda: MLP(784, (256,)), "784-256-10"),
    "lenet-259k": (lambda: LeNet(), "the paper's MNIST CNN"),
    "mlp-1M": (lambda: MLP(784, (1024, 256)), "784-1024-256-10"),
    "wrn-16-4-2.7M": (lambda: WideResNet(16, 4), "WRN-16-4 (CIFAR-10)"),
    "mlp-10M": (lambda: MLP(3072, (2048, 2048)), "3072-2048-2048-10"),
}


def legacy_features() -> types.ModuleType:
    """qan_ray/features.py as of BASE_COMMIT, as a module (the 'before' observation)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{BASE_COMMIT}:qan_ray/features.py"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("legacy_features")
    exec(compile(src, f"{BASE_COMMIT}:qan_ray/features.py", "exec"), module.__dict__)
    return module


def median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def before_ok(model) -> bool:
    """The old vector takes seconds per call above 1M parameters: 3 calls are enough there."""
    return sum(p.numel() for p in model.parameters()) <= 1_100_000


def measure(seeds: int, calls: int) -> list[dict]:
    old = legacy_features()
    rows = []
    for name, (factory, about) in MODELS.items():
        before, after = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = factory()
            observer = Observer(ObservationSpec(), 0.05)
            signals = old.signal_vector(0.05, 0.05, 1.0, 2.3, 1.1, 0.5, 0.5)
            before.append(median_ms(lambda m=model, s=signals: old.observation(m, s),
                                    calls if before_ok(model) else 3))
            after.append(median_ms(lambda m=model, o=observer: o.observe(
                m, lr=0.05, train_loss=1.0, val_loss=1.1, val_accuracy=0.5, progress=0.5),
                calls))
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "about": about, "params": params,
                     "before_len": old.observation_size(model),
                     "after_len": ObservationSpec().size,
                     "before": before, "after": after})
        print(f"{name:>14}: before {statistics.mean(before):7.2f} ms, after "
              f"{statistics.mean(after):6.2f} ms", flush=True)
    return rows


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def write(rows: list[dict], seeds: int, calls: int) -> None:
    lines = [
        "# Observation cost (benchmarks/observation_cost.py)",
        "",
        f"One CPU thread (`torch.set_num_threads(1)`), {platform.machine()}"
        f", torch {torch.__version__}. Median of {calls} calls per model init, mean +- sd over "
        f"{seeds} inits. Before: the per-layer vector of commit {BASE_COMMIT} (length grows with "
        "the layer count); after: the pooled contract observation (fixed length).",
        "",
        "| model | parameters | before: length | before: ms | after: length | after: ms | "
        "speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = statistics.mean(r["before"]), statistics.mean(r["after"])
        lines.append(f"| {r['model']} ({r['about']}) | {r['params']:,} | {r['before_len']} | "
                     f"{b:.2f} +- {sd(r['before']):.2f} | {r['after_len']} | {a:.2f} +- "
                     f"{sd(r['after']):.2f} | {b / a:.1f}x |")
    one_m = statistics.mean(next(r for r in rows if r["model"] == "mlp-1M")["after"])
    lines += ["", f"Goal: <= 10 ms at 1M parameters: {'met' if one_m <= 10 else 'NOT met'} "
              f"({one_m:.2f} ms).", "", f"observation_ms_1M: {one_m:.2f}", ""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    write(measure(args.seeds, args.calls), args.seeds, args.calls)


if __name__ == "__main__":
    main()
