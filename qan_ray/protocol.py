"""The experiment protocol of `qan tune` and `qan compare`: what every scheduler shares, so that
only the scheduler differs.

- the same trainable (trainables.targets, one iteration = one epoch of `TargetTrainer`);
- the same trial configs: `BasicVariantGenerator(random_state=seed)` samples the same LR (log-
  uniform in [lr_low, lr_high]) and per-trial init seed for every scheduler;
- the same resources: `max_concurrent` trials x `cpus_per_trial` CPUs, reuse_actors=True;
- the same metric: `val_score` (validation accuracy with a tiny loss tie-breaker, mode max);
- the same budget: at most `budget_epochs` epochs in total (default samples x epochs, what FIFO
  spends), counted by a driver-side Callback in arrival order -- epochs PBT rolls back and redoes
  count -- and enforced by a Stopper (Ray 2.60's asynchronous PBT can loop otherwise).

Scheduler names: fifo, asha, hyperband, median, pbt, pb2, qan, and qan+STOPPER (QAN sets the LR,
STOPPER in asha|hyperband|median|pbt decides STOP/CONTINUE; with pbt, PBT explores momentum).
A QAN name may end in @POLICY (builtin or a controller folder) to override --policy, so one
comparison can hold several controllers: qan,qan@builtin,asha,...

The CLI flags of `Protocol` are generated from its fields (`add_protocol_arguments`), as the task
flags are from `QANConfig`; the only hand-written one is `--lr-range LOW,HIGH` (lr_low, lr_high).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qan_ray.config import add_dataclass_arguments, config_from_args
from qan_ray.summaries import run_summary

METRIC, MODE = "val_score", "max"
BASE_SCHEDULERS = ("fifo", "asha", "hyperband", "median", "pbt", "pb2", "qan")
STOPPERS = ("asha", "hyperband", "median", "pbt")
SKIP_FLAGS = ("lr", "seed", "epochs_per_episode", "device")
"""QANConfig fields that are not task flags of `qan tune` and `qan compare` (the protocol
sets them)."""
DEST_PREFIX = "protocol_"
"""argparse dest prefix of the generated protocol flags (so they never clash with task flags)."""


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
    """Lower end of the log-uniform LR search space (flag: --lr-range LOW,HIGH)."""
    lr_high: float = 1.0
    """Upper end of the log-uniform LR search space (flag: --lr-range LOW,HIGH)."""
    max_concurrent: int = 2
    """Trials running at the same time."""
    cpus_per_trial: float = 1.0
    """CPUs per trial."""
    gpus_per_trial: float = 0.0
    """GPUs per trial (fractions allowed)."""
    budget_epochs: int | None = None
    """Cap on the total epochs of one experiment (default: samples x epochs, what FIFO spends)."""
    policy: str = "builtin"
    """QAN controller: 'builtin' or the folder of an exported controller (`qan train --out`)."""
    control_every: int = 1
    """QAN acts after every n-th epoch of a trial."""

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


# --- CLI flags, generated from the dataclass ---------------------------------------------------
def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per Protocol field (dest protocol_<field>, help = the field's docstring; unset =
    the dataclass default), plus --lr-range LOW,HIGH for lr_low/lr_high."""
    title = "experiment protocol (Protocol)"
    add_dataclass_arguments(p, Protocol, title, skip=("task_config", "lr_low", "lr_high"),
                            dest_prefix=DEST_PREFIX)
    group = next(g for g in p._action_groups if g.title == title)
    group.add_argument("--lr-range", dest=DEST_PREFIX + "lr_range", default=None,
                       metavar="LOW,HIGH", help="Log-uniform LR search space (Protocol.lr_low, "
                       "lr_high; default 0.001,1).")


def _lr_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError as err:
        raise ValueError(f"--lr-range is {text!r}; it must be LOW,HIGH, e.g. 0.001,1.") from err
    return low, high


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    """The validated Protocol of parsed flags (task flags fall back to the --task preset)."""
    given = {f.name: getattr(args, DEST_PREFIX + f.name) for f in dataclasses.fields(Protocol)
             if getattr(args, DEST_PREFIX + f.name, None) is not None}
    lr_range = getattr(args, DEST_PREFIX + "lr_range", None)
    if lr_range is not None:
        given["lr_low"], given["lr_high"] = _lr_range(lr_range)
    cfg = config_from_args(args)
    task_flags = {k: getattr(args, k) for k in cfg.to_dict()
                  if k not in SKIP_FLAGS and getattr(args, k, None) is not None}
    task_config = {"task": cfg.task, **{k: (list(v) if isinstance(v, tuple) else v)
                                        for k, v in task_flags.items()}}
    return Protocol(task_config=task_config, **given).validate()


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
    """The trial configs: the task's fixed keys, the epochs, and the searched LR and init seed."""
    from ray import tune

    return {**proto.task_config, "epochs": proto.epochs,
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
    summary = run_summary(name, seed, counter.rows, trials=len(results), wall_s=wall,
                          budget=proto.budget)
    log(f"  {name:<14} seed {seed}: best val acc {summary['best_val_accuracy']:.4f}, "
        f"{summary['total_epochs']:.0f} epochs, {wall:.1f}s")
    return {"summary": summary, "rows": counter.rows}
