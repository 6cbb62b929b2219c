"""matplotlib figures (Agg backend: no display needed). Each function takes plain rows/tables and
a path, writes one PNG and returns the path."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qan_ray.constants import NUM_CLASSES  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curve(steps, path) -> Path:
    """Final validation accuracy and return of every meta-training episode (a pyarrow table or a
    list of step rows with episode, val_accuracy, reward)."""
    rows = steps.to_pylist() if hasattr(steps, "to_pylist") else list(steps)
    final: dict[int, float] = {}
    ret: dict[int, float] = defaultdict(float)
    for r in rows:
        final[r["episode"]] = r["val_accuracy"] if r["val_accuracy"] is not None else np.nan
        ret[r["episode"]] += r["reward"] or 0.0
    eps = sorted(final)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e + 1 for e in eps], [final[e] for e in eps], "o-", label="final val accuracy")
    ax.set_xlabel("meta-training episode")
    ax.set_ylabel("final validation accuracy")
    ax2 = ax.twinx()
    ax2.plot([e + 1 for e in eps], [ret[e] for e in eps], "s--", color="tab:orange",
             alpha=0.6, label="episode return")
    ax2.set_ylabel("episode return")
    ax.set_title("controller learning curve (exploring, epsilon-greedy)")
    ax.legend(loc="lower left")
    ax2.legend(loc="lower right")
    return _save(fig, path)


def _mean_curves(curves: list[dict], key: str) -> dict[str, tuple[np.ndarray, ...]]:
    """method -> (batches, mean, std) of `key` over seeds (runs share their control points)."""
    by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in curves:
        if r.get(key) is not None:
            by[r["method"]][r["batches"]].append(r[key])
    out = {}
    for method, points in by.items():
        xs = np.array(sorted(points))
        vals = [np.array(points[x], dtype=float) for x in xs]
        out[method] = (xs, np.array([v.mean() for v in vals]), np.array([v.std() for v in vals]))
    return out


def plot_accuracy_curves(curves: list[dict], path, target: float | None = None,
                         batches_per_epoch: int | None = None) -> Path:
    """Validation accuracy against training progress, QAN vs each baseline (mean +- std)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    scale = batches_per_epoch or 1
    for method, (xs, mean, std) in sorted(_mean_curves(curves, "val_accuracy").items()):
        style = "-" if method.startswith("qan") else "--"
        ax.plot(xs / scale, mean, style, lw=2 if method.startswith("qan") else 1.2, label=method)
        ax.fill_between(xs / scale, mean - std, mean + std, alpha=0.12)
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:.3f}")
    ax.set_xlabel("epoch" if batches_per_epoch else "mini-batches")
    ax.set_ylabel("validation accuracy")
    lo = min((m.min() for _, m, _ in _mean_curves(curves, "val_accuracy").values()), default=0)
    ax.set_ylim(max(0.0, lo if lo > 0.5 else 0.5), 1.0)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs training progress (mean +- std over seeds)")
    return _save(fig, path)


def plot_lr(curves: list[dict], path, methods_prefix: str = "qan") -> Path:
    """Learning rate over time: every seed of the controller, the mean of each baseline; the
    rescue guard's rollbacks are marked with a red x (at the LR the dying interval had)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    rescued = [(r["batches"], r["lr"]) for r in curves if r.get("rescued")]
    if rescued:
        ax.scatter(*zip(*rescued), marker="x", color="red", s=40, zorder=5,
                   label=f"rescue ({len(rescued)})")
    for r_method in sorted({r["method"] for r in curves}):
        runs = defaultdict(list)
        for r in curves:
            if r["method"] == r_method and r.get("lr") is not None:
                runs[r["seed"]].append((r["batches"], r["lr"]))
        if r_method.startswith(methods_prefix):
            for i, (seed, pts) in enumerate(sorted(runs.items())):
                pts.sort()
                ax.step(*zip(*pts), where="post", lw=1.8, alpha=0.8,
                        label=f"{r_method} seed {seed}" if i < 5 else None)
        elif runs:
            pts = sorted(next(iter(runs.values())))
            ax.step(*zip(*pts), where="post", ls="--", lw=1, label=r_method)
    ax.set_yscale("log")
    ax.set_xlabel("mini-batches")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("learning rate chosen by the controller vs baselines")
    return _save(fig, path)


def plot_class_shares(curves: list[dict], path) -> Path:
    """Minibatch mode: share of each class in the chosen batches over time (controller runs)."""
    rows = [r for r in curves if r["method"].startswith("qan") and r.get("composition")]
    by_step: dict[int, list[np.ndarray]] = defaultdict(list)
    for r in rows:
        comp = np.asarray(r["composition"], dtype=float)
        by_step[r["batches"]].append(comp / comp.sum())
    xs = sorted(by_step)
    shares = (np.array([np.mean(by_step[x], axis=0) for x in xs]) if xs
              else np.zeros((0, NUM_CLASSES)))
    fig, ax = plt.subplots(figsize=(8, 4))
    if len(xs):
        ax.stackplot(xs, shares.T, labels=[f"class {c}" for c in range(shares.shape[1])])
    ax.set_xlabel("mini-batches")
    ax.set_ylabel("share of batch")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=5, loc="upper center")
    ax.set_title("class shares of the batches the controller chose (mean over seeds)")
    return _save(fig, path)


def plot_compare(runs: list[dict], summaries: list[dict], path) -> Path:
    """`qan compare`: best validation accuracy against cumulative epochs, one colour per
    scheduler (one line per seed), the per-seed target accuracies dotted; beside it every
    trial's final validation accuracy per scheduler (dead trials below the red line). `runs` are
    {"summary": {...}, "rows": [...]} of `qan_ray.protocol.run_experiment`, `summaries` the rows
    of `qan_ray.summaries.add_targets`."""
    import math

    from qan_ray.constants import DEAD_MARGIN, chance_accuracy
    from qan_ray.summaries import best_curve, final_accuracies

    names = list(dict.fromkeys(r["summary"]["scheduler"] for r in runs))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, (ax, trials) = plt.subplots(1, 2, figsize=(11, 4.5),
                                     gridspec_kw={"width_ratios": [3, 2]})
    for i, name in enumerate(names):  # what every trial ended with, not only the best
        finals = [a for r in runs if r["summary"]["scheduler"] == name
                  for a in final_accuracies(r["rows"]).values()]
        jitter = np.linspace(-0.2, 0.2, len(finals)) if len(finals) > 1 else [0.0]
        trials.scatter(np.asarray(jitter) + i, finals, s=14, color=colours[name], alpha=0.7)
    trials.axhline(chance_accuracy() + DEAD_MARGIN, color="red", linestyle=":", linewidth=1,
                   label="dead below")
    trials.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    trials.set_ylabel("final val accuracy of every trial")
    trials.legend(fontsize=7)
    trials.grid(alpha=0.3)
    for r in runs:
        name = r["summary"]["scheduler"]
        curve = best_curve(r["rows"])
        if curve:
            xs, ys = zip(*curve)
            first = r is next(x for x in runs if x["summary"]["scheduler"] == name)
            ax.step(xs, ys, where="post", color=colours[name], alpha=0.8,
                    label=name if first else None)
    for t in sorted({s["target_accuracy"] for s in summaries}):
        ax.axhline(t, color="grey", linestyle=":", linewidth=1)
    finite = [y for r in runs for _, y in best_curve(r["rows"]) if math.isfinite(y)]
    targets = [s["target_accuracy"] for s in summaries]
    if finite:  # zoom on the region around the targets; curves enter it from below
        low = min(finite) if not targets else max(min(finite), min(targets) - 0.08)
        ax.set_ylim(max(0.0, low - 0.01), min(1.0, max(finite) + 0.01))
    ax.set_xlabel("cumulative training epochs (all trials, arrival order)")
    ax.set_ylabel("best validation accuracy so far")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
