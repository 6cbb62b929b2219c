"""`qan tune` (one Ray Tune experiment) and `qan compare` (several schedulers, same protocol).

The protocol every scheduler gets, so only the scheduler differs:
- the same trainable (trainables.targets, one iteration = one epoch of `TargetTrainer`);
- the same trial configs: `BasicVariantGenerator(random_state=seed)` samples the same LR (log-
  uniform in [lr_low, lr_high]) and per-trial init seed for every scheduler;
- the same resources: `max_concurrent` trials x `cpus_per_trial` CPUs, reuse_actors=True;
- the same metric: `val_score` (validation accuracy with a tiny loss tie-breaker, mode max);
- the same budget: at most `budget_epochs` epochs in total (default samples x epochs, what FIFO
  spends), counted by a driver-side Callback in arrival order -- epochs PBT rolls back and redoes
  count -- and enforced by a Stopper (Ray 2.60's asynchronous PBT can loop otherwise).
Measured per run: best validation accuracy, epochs until the target accuracy (target = the best
baseline's best validation accuracy x target_fraction, per seed; baselines = the schedulers whose
name does not start with "qan"), total epochs, wall time, and the test accuracy of the best trial
that finished its budget.

Scheduler names: fifo, asha, hyperband, median, pbt, pb2, qan, and qan+STOPPER (QAN sets the LR,
STOPPER in asha|hyperband|median|pbt decides STOP/CONTINUE; with pbt, PBT explores momentum).
A QAN name may end in @POLICY (builtin or a controller folder) to override --policy, so one
comparison can hold several controllers: qan,qan@builtin,asha,...
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qan_ray.config import add_config_arguments, config_from_args

METRIC, MODE = "val_score", "max"
BASE_SCHEDULERS = ("fifo", "asha", "hyperband", "median", "pbt", "pb2", "qan")
STOPPERS = ("asha", "hyperband", "median", "pbt")
SKIP_FLAGS = ("lr", "seed", "epochs_per_episode", "device")


@dataclass
class Protocol:
    """What every scheduler of a comparison shares."""

    task_config: dict[str, Any]
    """QANConfig fields passed to the trainable (task preset + explicit flags)."""
    samples: int = 8
    """Trials per experiment."""
    epochs: int = 8
    """Epochs per trial (the iteration budget of one trial)."""
    lr_low: float = 1e-3
    """Lower end of the log-uniform LR search space."""
    lr_high: float = 1.0
    """Upper end of the log-uniform LR search space."""
    max_concurrent: int = 2
    """Trials running at the same time."""
    cpus_per_trial: float = 1.0
    """CPUs per trial."""
    gpus_per_trial: float = 0.0
    """GPUs per trial (fractions allowed)."""
    budget_epochs: int | None = None
    """Cap on the total epochs of one experiment (None = samples x epochs)."""
    policy: str = "builtin"
    """QAN controller: 'builtin' or the folder of an exported controller."""
    control_every: int = 1
    """QAN acts after every n-th epoch of a trial."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More fixed trainable keys (e.g. checkpoint_every)."""

    def validate(self) -> Protocol:
        for name in ("samples", "epochs", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` is {getattr(self, name)}; it must be >= 1. "
                                 f"Try --{name.replace('_', '-')} 2.")
        if not (0 < self.lr_low < self.lr_high):
            raise ValueError(f"the LR range is [{self.lr_low}, {self.lr_high}]; it must satisfy "
                             "0 < low < high. Try --lr-range 0.001,1.")
        if self.budget_epochs is not None and self.budget_epochs < 1:
            raise ValueError(f"`budget_epochs` is {self.budget_epochs}; it must be >= 1 "
                             "(or unset for samples x epochs).")
        return self

    @property
    def budget(self) -> int:
        return self.budget_epochs or self.samples * self.epochs


# --- pure summaries of one run (arrival-ordered rows) -------------------------------------------
def best_curve(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(cumulative epochs, best validation accuracy so far) after every result."""
    best, out = -math.inf, []
    for r in rows:
        acc = r.get("val_accuracy")
        if acc is not None and math.isfinite(acc):
            best = max(best, acc)
        out.append((r["epochs"], best))
    return out


def epochs_to_target(rows: list[dict[str, Any]], target: float) -> float | None:
    """Cumulative epochs at the first result whose validation accuracy reaches `target`."""
    for r in rows:
        acc = r.get("val_accuracy")
        if acc is not None and math.isfinite(acc) and acc >= target - 1e-12:
            return float(r["epochs"])
    return None


def best_finished_test(rows: list[dict[str, Any]]) -> float | None:
    """Test accuracy of the trial whose last-epoch validation accuracy is best (among trials that
    trained their whole budget, i.e. reported test_accuracy)."""
    finished = [r for r in rows if r.get("test_accuracy") is not None
                and r.get("val_accuracy") is not None and math.isfinite(r["val_accuracy"])]
    if not finished:
        return None
    return float(max(finished, key=lambda r: r["val_accuracy"])["test_accuracy"])


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def is_baseline(name: str) -> bool:
    return not name.startswith("qan")


# --- Tune pieces -------------------------------------------------------------------------------
def epoch_counter():
    """A driver-side Tune Callback counting epochs in arrival order (one row per result)."""
    from ray.tune import Callback

    class EpochCounter(Callback):
        def __init__(self) -> None:
            self.total = 0.0
            self.rows: list[dict[str, Any]] = []
            self.start = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.total += float(result.get("epochs_this_iter", 1.0))
            self.rows.append({
                "epochs": self.total, "trial": trial.trial_id,
                "iteration": int(result.get("training_iteration", 0)),
                "val_accuracy": _num(result.get("val_accuracy")),
                "val_loss": _num(result.get("val_loss")), "lr": _num(result.get("lr")),
                "test_accuracy": _num(result.get("test_accuracy")),
                "seconds": time.perf_counter() - self.start,
            })

    return EpochCounter()


def epoch_budget(counter, budget: float):
    """A Tune Stopper that ends the experiment once `counter` has seen `budget` epochs."""
    from ray.tune import Stopper

    class EpochBudget(Stopper):
        def __init__(self) -> None:
            self.counter, self.budget = counter, budget

        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return self.counter.total >= self.budget

    return EpochBudget()


def quiet_tune() -> None:
    """Our own lines only: no Tune progress tables (verbose=0 with the classic reporter), no
    per-exploit INFO lines of PBT, no warnings about result files of cloned trials."""
    import logging
    import os

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    logging.getLogger("ray.tune.logger").setLevel(logging.ERROR)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def make_scheduler(name: str, proto: Protocol):
    """A fresh scheduler for `name` (see the module docstring)."""
    from ray import tune
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        HyperBandScheduler,
        MedianStoppingRule,
        PopulationBasedTraining,
    )

    name, _, policy = name.partition("@")  # qan@builtin, qan+asha@runs/ctrl/controller
    base, _, stopper = name.partition("+")
    if policy and base != "qan":
        raise ValueError(f"scheduler {name}@{policy}: only QAN schedulers take a policy "
                         "(qan@builtin, qan+asha@DIR).")
    if base not in BASE_SCHEDULERS or (stopper and (base != "qan" or stopper not in STOPPERS)):
        raise ValueError(f"scheduler {name!r} is unknown; use one of {BASE_SCHEDULERS} or "
                         f"qan+STOPPER with STOPPER in {STOPPERS} (e.g. qan+asha).")
    epochs = proto.epochs
    interval = max(1, epochs // 4)
    lr_space = tune.loguniform(proto.lr_low, proto.lr_high)

    def stopping(kind: str, qan: bool = False):
        if kind == "asha":
            return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=1,
                                 reduction_factor=3)
        if kind == "hyperband":
            return HyperBandScheduler(time_attr="training_iteration", max_t=epochs,
                                      reduction_factor=3)
        if kind == "median":
            return MedianStoppingRule(time_attr="training_iteration", grace_period=2,
                                      min_samples_required=3)
        if kind == "pbt":  # beside QAN, PBT explores momentum; alone, it explores the LR
            mutations = ({"momentum": tune.uniform(0.5, 0.99)} if qan else {"lr": lr_space})
            return PopulationBasedTraining(time_attr="training_iteration",
                                           perturbation_interval=interval, quantile_fraction=0.25,
                                           hyperparam_mutations=mutations)
        if kind == "pb2":
            return _pb2(epochs, interval, proto)
        return FIFOScheduler()

    if base == "qan":
        from qan_ray.scheduler import QANScheduler

        return QANScheduler(policy=policy or proto.policy, control_every=proto.control_every,
                            stopper=stopping(stopper, qan=True) if stopper else None)
    return stopping(base)


def _pb2(epochs: int, interval: int, proto: Protocol):
    try:
        import sklearn  # noqa: F401 - PB2's Gaussian process (Ray 2.60 uses scikit-learn)
        from ray.tune.schedulers.pb2 import PB2
    except ImportError as err:
        missing = getattr(err, "name", None) or "scikit-learn"
        raise ValueError(f"scheduler 'pb2' needs {missing!r}, which does not import here "
                         f"({err}). Install it with: pip install scikit-learn (Ray < 2.10 also "
                         "needs GPy: pip install GPy scikit-learn).") from err
    return PB2(time_attr="training_iteration", perturbation_interval=interval,
               hyperparam_bounds={"lr": [proto.lr_low, proto.lr_high]})


def param_space(proto: Protocol) -> dict[str, Any]:
    from ray import tune

    return {**proto.task_config, **proto.extra, "epochs": proto.epochs,
            "lr": tune.loguniform(proto.lr_low, proto.lr_high),
            "seed": tune.randint(0, 1_000_000)}


def storage_uri(storage: str | Path) -> str:
    """Tune's storage_path: a cloud URI (s3://, gs://, ...) as given, a local path absolute."""
    text = str(storage)
    return text if "://" in text else str(Path(text).resolve())


def run_experiment(name: str, proto: Protocol, seed: int, storage: str | Path,
                   log=print) -> dict[str, Any]:
    """One Tune experiment with scheduler `name`; returns the summary row and the trace rows."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from trainables.targets import trainable_for

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    quiet_tune()
    scheduler = make_scheduler(name, proto)
    counter = epoch_counter()
    trainable = tune.with_resources(trainable_for(proto.task_config.get("task", "digits-mlp")),
                                    {"cpu": proto.cpus_per_trial, "gpu": proto.gpus_per_trial})
    tag = re.sub(r"[^A-Za-z0-9_.]+", "-", name)
    exp_name = f"{proto.task_config.get('task')}-{tag}-s{seed}-{time.time_ns()}"
    tuner = tune.Tuner(
        trainable, param_space=param_space(proto),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=proto.samples,
            search_alg=BasicVariantGenerator(random_state=seed,
                                             max_concurrent=proto.max_concurrent),
            reuse_actors=True),
        run_config=tune.RunConfig(
            name=exp_name, storage_path=storage_uri(storage), verbose=0,
            stop=epoch_budget(counter, proto.budget), callbacks=[counter],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=0)))
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    errors = [str(r.error) for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{name} (seed {seed}): {len(errors)} trial(s) failed; first: "
                           f"{errors[0][:2000]}")
    rows = counter.rows
    summary = {
        "scheduler": name, "seed": seed, "trials": len(results),
        "best_val_accuracy": max((r["val_accuracy"] for r in rows
                                  if r["val_accuracy"] is not None), default=math.nan),
        "total_epochs": counter.total, "wall_s": wall, "hit_budget": counter.total >= proto.budget,
        "test_accuracy_best_finished": best_finished_test(rows),
    }
    log(f"  {name:<14} seed {seed}: best val acc {summary['best_val_accuracy']:.4f}, "
        f"{counter.total:.0f} epochs, {wall:.1f}s")
    return {"summary": summary, "rows": rows}


def add_targets(runs: list[dict[str, Any]], target_fraction: float) -> list[dict[str, Any]]:
    """Per seed: the target accuracy and every run's epochs until it (pure over the runs)."""
    seeds = sorted({r["summary"]["seed"] for r in runs})
    out = []
    for seed in seeds:
        of_seed = [r for r in runs if r["summary"]["seed"] == seed]
        pool = [r for r in of_seed if is_baseline(r["summary"]["scheduler"])] or of_seed
        best = max(r["summary"]["best_val_accuracy"] for r in pool)
        target = best * target_fraction
        for r in of_seed:
            s = dict(r["summary"], target_accuracy=target,
                     epochs_to_target=epochs_to_target(r["rows"], target))
            out.append(s)
    return out


def table_rows(summaries: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One row per scheduler: mean and sd over seeds of every measure."""
    rows = []
    for name in names:
        mine = [s for s in summaries if s["scheduler"] == name]
        reached = [s["epochs_to_target"] for s in mine if s["epochs_to_target"] is not None]
        row = {"scheduler": name, "seeds": len(mine), "reached_target": len(reached)}
        for key in ("best_val_accuracy", "epochs_to_target", "total_epochs", "wall_s",
                    "test_accuracy_best_finished"):
            m, sd = mean_sd([s[key] for s in mine if s[key] is not None])
            row[f"{key}_mean"], row[f"{key}_sd"] = m, sd
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], target_note: str) -> str:
    def ms(r: dict[str, Any], key: str, fmt: str) -> str:
        m, sd = r[f"{key}_mean"], r[f"{key}_sd"]
        return "n/a" if math.isnan(m) else f"{m:{fmt}} ± {sd:{fmt}}"

    lines = [f"Target accuracy: {target_note}", "",
             "| scheduler | best val acc | epochs to target (reached) | total epochs | wall s "
             "| test acc (best finished trial) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheduler']} | {ms(r, 'best_val_accuracy', '.4f')} | "
                     f"{ms(r, 'epochs_to_target', '.1f')} ({r['reached_target']}/{r['seeds']}) | "
                     f"{ms(r, 'total_epochs', '.1f')} | {ms(r, 'wall_s', '.1f')} | "
                     f"{ms(r, 'test_accuracy_best_finished', '.4f')} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], summaries: list[dict[str, Any]], path: Path) -> Path:
    """Best validation accuracy against cumulative epochs, one colour per scheduler (one line
    per seed), the per-seed targets dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["summary"]["scheduler"] for r in runs))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(names: list[str], proto: Protocol, seeds: list[int], out: Path,
            target_fraction: float = 1.0, log=print,
            storage: str | Path | None = None) -> dict[str, Any]:
    """Run every scheduler on every seed; write compare.md, compare.parquet, trace.parquet and
    compare.png under `out`; return the table rows and the Markdown."""
    from qan_ray.records import write_table

    proto.validate()
    if not 0 < target_fraction <= 1:
        raise ValueError(f"`target_fraction` is {target_fraction}; it must lie in (0, 1]. "
                         "Try 1.0 (the best baseline's accuracy itself) or 0.99.")
    for name in names:  # fail fast on a bad name or a missing controller, before any run
        make_scheduler(name, proto)
    runs = []
    for seed in seeds:
        for name in names:
            runs.append(run_experiment(name, proto, seed, storage or out / "ray", log=log))
    summaries = add_targets(runs, target_fraction)
    rows = table_rows(summaries, names)
    note = (f"{target_fraction:g} x the best baseline's best validation accuracy, per seed "
            f"(baselines: {[n for n in names if is_baseline(n)] or names})")
    text = markdown(rows, note)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    write_table(out / "compare.parquet", summaries)
    write_table(out / "trace.parquet", [{**row, "scheduler": r["summary"]["scheduler"],
                                         "seed": r["summary"]["seed"]}
                                        for r in runs for row in r["rows"]])
    plot(runs, summaries, out / "compare.png")
    return {"rows": rows, "summaries": summaries, "markdown": text, "runs": runs}


# --- CLI -----------------------------------------------------------------------------------------
def _add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment protocol")
    g.add_argument("--samples", type=int, default=8, help="trials per experiment")
    g.add_argument("--epochs", type=int, default=8, help="epochs per trial")
    g.add_argument("--lr-range", default="0.001,1", help="log-uniform LR search space LOW,HIGH")
    g.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    g.add_argument("--cpus-per-trial", type=float, default=1.0)
    g.add_argument("--gpus-per-trial", type=float, default=0.0)
    g.add_argument("--budget-epochs", type=int, default=None,
                   help="cap on total epochs per experiment (default samples x epochs)")
    g.add_argument("--policy", default="builtin",
                   help="QAN controller: builtin or a `qan train` controller folder")
    g.add_argument("--control-every", type=int, default=1, help="QAN acts every n epochs")
    g.add_argument("--out", default="runs/compare", help="output folder")
    g.add_argument("--storage-path", default=None,
                   help="Ray Tune storage (trial checkpoints): a path every node can write or a "
                        "cloud URI such as s3://bucket/qan (default: OUT/ray)")
    add_config_arguments(p, skip=SKIP_FLAGS)


def _protocol(args: argparse.Namespace) -> Protocol:
    try:
        low, high = (float(x) for x in args.lr_range.split(","))
    except ValueError as err:
        raise ValueError(f"--lr-range is {args.lr_range!r}; it must be LOW,HIGH, e.g. "
                         "0.001,1.") from err
    cfg = config_from_args(args)
    given = {k: getattr(args, k) for k in cfg.to_dict()
             if k not in SKIP_FLAGS and getattr(args, k, None) is not None}
    task_config = {"task": cfg.task, **{k: (list(v) if isinstance(v, tuple) else v)
                                        for k, v in given.items()}}
    return Protocol(task_config=task_config, samples=args.samples, epochs=args.epochs,
                    lr_low=low, lr_high=high, max_concurrent=args.max_concurrent,
                    cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                    budget_epochs=args.budget_epochs, policy=args.policy,
                    control_every=args.control_every).validate()


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"--seeds is {text!r}; it must be comma-separated integers, e.g. "
                         "0,1,2.") from err
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds 0.")
    return seeds


def configure_tune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default="qan",
                   help=f"one of {BASE_SCHEDULERS} or qan+STOPPER ({'|'.join(STOPPERS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the trial configs")
    _add_protocol_arguments(p)
    p.set_defaults(out="runs/tune")


def run_tune(args: argparse.Namespace) -> int:
    proto = _protocol(args)
    make_scheduler(args.scheduler, proto)  # bad name / missing controller: fail before Ray
    print(f"qan tune: {args.scheduler} on {proto.task_config['task']}, {proto.samples} trials x "
          f"{proto.epochs} epochs, LR in [{proto.lr_low:g}, {proto.lr_high:g}], seed {args.seed}")
    out = Path(args.out)
    run = run_experiment(args.scheduler, proto, args.seed, args.storage_path or out / "ray")
    by_trial: dict[str, dict[str, Any]] = {}
    for r in run["rows"]:
        t = by_trial.setdefault(r["trial"], {"first_lr": r["lr"], "best": -math.inf})
        t.update(last_lr=r["lr"], epochs=r["iteration"])
        if r["val_accuracy"] is not None:
            t["best"] = max(t["best"], r["val_accuracy"])
    print(f"{'trial':<14} {'lr start':>9} {'lr end':>9} {'epochs':>6} {'best val acc':>12}")
    for tid, t in by_trial.items():
        print(f"{tid:<14} {t['first_lr']:>9.4g} {t['last_lr']:>9.4g} {t['epochs']:>6} "
              f"{t['best']:>12.4f}")
    s = run["summary"]
    print(f"best val acc {s['best_val_accuracy']:.4f}; {s['total_epochs']:.0f} epochs in total; "
          f"{s['wall_s']:.1f}s")
    return 0


def configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedulers", default="qan,asha,pbt,fifo",
                   help="comma-separated scheduler names (fifo, asha, hyperband, median, pbt, "
                        "pb2, qan, qan+asha, ...)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the trial configs")
    p.add_argument("--target-fraction", type=float, default=1.0,
                   help="target = this x the best baseline's best validation accuracy")
    _add_protocol_arguments(p)


def run_compare(args: argparse.Namespace) -> int:
    proto = _protocol(args)
    names = [n.strip() for n in args.schedulers.split(",") if n.strip()]
    seeds = _seeds(args.seeds)
    out = Path(args.out)
    print(f"qan compare: {names} on {proto.task_config['task']}, seeds {seeds}, "
          f"{proto.samples} trials x {proto.epochs} epochs (budget {proto.budget} epochs), "
          f"{proto.max_concurrent} concurrent")
    result = compare(names, proto, seeds, out, target_fraction=args.target_fraction,
                     storage=args.storage_path)
    print(result["markdown"])
    print(f"wrote {out / 'compare.md'}, {out / 'compare.parquet'}, {out / 'trace.parquet'}, "
          f"{out / 'compare.png'}")
    return 0
