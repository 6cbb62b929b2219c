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
BASE+cosine (fifo, asha, hyperband or median + cosine) is what a Tune user runs without QAN: every
trial decays its sampled LR along a cosine over its whole epoch budget (the trainable applies it,
config key `trial_schedule`, so it survives checkpoint restores), while BASE decides STOP/CONTINUE
exactly as alone. PBT and PB2 are left out: they mutate the LR the schedule starts from.
What a user runs instead of tuning the LR (qan_ray.lrfree): prodigy and dadapt (every trial at
LR 1 with a cosine over its epochs; the trials differ in their init seed) and schedulefree (the
sampled LR, constant, with its warm-up), each alone (FIFO) or with a stopper: prodigy+asha,
schedulefree+asha, ... (STOPPER in asha|hyperband|median). What an Optuna user runs: tpe+asha
(Tune's OptunaSearch with a seeded TPESampler instead of random search, ASHA as the pruner; tpe
alone is TPE with FIFO); `qan compare --search tpe` adds that row.

The CLI flags of `Protocol` are generated from its fields (`add_protocol_arguments`), as the task
flags are from `QANConfig`; the only hand-written one is `--lr-range LOW,HIGH` (lr_low, lr_high).

Faults: with a `record` folder, one experiment keeps experiment.json (its Tune path, written
before it starts), rows.jsonl (every result, appended as it arrives) and, once it has finished,
summary.json. An experiment stopped by Ctrl-C / SIGINT (Tune's graceful stop returns normally)
raises `ExperimentInterrupted`; `resume=True` continues it through `tune.Tuner.restore`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qan_ray.config import add_dataclass_arguments, documented
from qan_ray.distribution import config_from_args
from qan_ray.records import fault_point
from qan_ray.signals import sigterm_as_sigint
from qan_ray.summaries import run_summary

METRIC, MODE = "val_score", "max"
BASE_SCHEDULERS = ("fifo", "asha", "hyperband", "median", "pbt", "pb2", "qan")
STOPPERS = ("asha", "hyperband", "median", "pbt")
TRIAL_SCHEDULES = ("cosine",)
"""Per-trial LR schedules a scheduler name may add (BASE+cosine), applied by the trainable."""
SCHEDULED_BASES = ("fifo", "asha", "hyperband", "median")
"""The schedulers that take a per-trial schedule: they only stop trials, never change the LR."""
SCHEDULED_NAMES = tuple(f"{b}+{s}" for s in TRIAL_SCHEDULES for b in SCHEDULED_BASES)
LR_FREE = ("prodigy", "schedulefree", "dadapt")
"""LR-free optimizers as scheduler names (qan_ray.lrfree.METHODS), alone or +STOPPER."""
SEARCHERS = ("tpe",)
"""Search algorithms as scheduler names (tpe, tpe+asha): they replace random search."""
PLAIN_STOPPERS = ("asha", "hyperband", "median")
"""The stoppers an LR-free optimizer or a searcher runs with (they never change the LR)."""
TPE_STARTUP = 0.25
"""TPESampler's random start: this share of the trials (at least 2) before TPE models them."""
SKIP_FLAGS = ("lr", "seed", "epochs_per_episode", "device")
"""QANConfig fields that are not task flags of `qan tune` and `qan compare` (the protocol
sets them)."""
DEST_PREFIX = "protocol_"
"""argparse dest prefix of the generated protocol flags (so they never clash with task flags)."""


@dataclass
class Protocol:
    """What every scheduler of a comparison shares."""

    task_config: dict[str, Any] = documented(doc="""
        QANConfig fields passed to the trainable (task preset + explicit flags).""")
    samples: int = documented(8, """
        Trials per experiment.""")
    epochs: int = documented(8, """
        Epochs per trial (the iteration budget of one trial).""")
    lr_low: float = documented(1e-3, """
        Lower end of the log-uniform LR search space (flag: --lr-range LOW,HIGH).""")
    lr_high: float = documented(1.0, """
        Upper end of the log-uniform LR search space (flag: --lr-range LOW,HIGH).""")
    max_concurrent: int = documented(2, """
        Trials running at the same time.""")
    cpus_per_trial: float = documented(1.0, """
        CPUs per trial.""")
    gpus_per_trial: float = documented(0.0, """
        GPUs per trial (fractions allowed).""")
    budget_epochs: int | None = documented(None, """
        Cap on the total epochs of one experiment (default: samples x epochs, what FIFO
        spends).""")
    policy: str = documented("builtin", """
        QAN controller: 'builtin' or the folder of an exported controller (`qan train --out`).""")
    control_every: int = documented(1, """
        QAN acts after every n-th epoch of a trial.""")

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
    """One flag per Protocol field (dest protocol_<field>, help = the field's help text; unset =
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
    cfg = config_from_args(args)  # loads a user task: a bad one fails before Ray starts
    task_flags = {k: getattr(args, k) for k in cfg.to_dict()
                  if k not in SKIP_FLAGS and getattr(args, k, None) is not None}
    task_config = {"task": cfg.task, **{k: (list(v) if isinstance(v, tuple) else v)
                                        for k, v in task_flags.items()}}
    return Protocol(task_config=task_config, **given).validate()


class ExperimentInterrupted(RuntimeError):
    """A Tune experiment stopped by Ctrl-C / SIGINT before it finished (Tune returns normally)."""

    def __init__(self, name: str, seed: int, epochs: float, budget: float, path: str):
        self.name, self.seed, self.epochs = name, seed, epochs
        self.budget, self.path = budget, path
        super().__init__(f"{name} (seed {seed}) was interrupted at {epochs:.0f} of {budget} "
                         f"epochs (Tune state: {path})")


def _interrupt_flag(event: threading.Event) -> None:
    """Chain onto the SIGINT handler Tune installed for its graceful stop, so that we know it
    fired (Tune's fit() returns normally after it). Called from Callback.setup, after Tune set
    its handler; main thread only, as signals are."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", None)):
        if sig is None:
            continue
        tune_handler = signal.getsignal(sig)

        def handler(signum, frame, _next=tune_handler):
            event.set()
            if callable(_next):
                _next(signum, frame)
            else:
                raise KeyboardInterrupt
        signal.signal(sig, handler)


# --- Tune pieces -------------------------------------------------------------------------------
def epoch_counter(log_path: str | Path | None = None):
    """A driver-side Tune Callback counting epochs in arrival order (one row per result). With
    `log_path`, each row is appended to that JSON-lines file as it arrives and read back at
    setup, so a restored experiment keeps counting (Tune pickles the callback at the start)."""
    from ray.tune import Callback

    class EpochCounter(Callback):
        def __init__(self) -> None:
            self.total = 0.0
            self.rows: list[dict[str, Any]] = []
            self.start = time.perf_counter()
            self.log_path = None if log_path is None else str(Path(log_path).resolve())
            self.interrupted = threading.Event()

        def __getstate__(self):
            state = dict(self.__dict__)
            state["interrupted"] = None
            return state

        def __setstate__(self, state):
            self.__dict__.update(state)
            self.interrupted = threading.Event()

        def setup(self, **info) -> None:
            _interrupt_flag(self.interrupted)
            self.rows = read_rows(self.log_path) if self.log_path else []
            self.total = float(self.rows[-1]["epochs"]) if self.rows else 0.0
            done = self.rows[-1]["seconds"] if self.rows else 0.0
            self.start = time.perf_counter() - done

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.total += float(result.get("epochs_this_iter", 1.0))
            row = {
                "epochs": self.total, "trial": trial.trial_id,
                "iteration": int(result.get("training_iteration", 0)),
                "val_accuracy": _num(result.get("val_accuracy")),
                "val_loss": _num(result.get("val_loss")), "lr": _num(result.get("lr")),
                "test_accuracy": _num(result.get("test_accuracy")),
                "diverged": bool(result.get("diverged", False)),
                "rescues": int(_num(result.get("qan_rescues")) or 0),
                "seconds": time.perf_counter() - self.start,
            }
            self.rows.append(row)
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            fault_point("tune-result")  # QAN_FAULT=tune-result:N:sigint: Ctrl-C at result N

    return EpochCounter()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an experiment's rows.jsonl (a torn last line, from a kill, is dropped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


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


def align_action_mode(names: list[str], proto: Protocol) -> str | None:
    """Before Ray starts: check every scheduler name (an unknown one fails here, naming the
    valid ones), load every QAN scheduler's controller (a corrupt or missing one fails here,
    naming the file), refuse a --action-mode that differs from a controller's, and set the
    trials' action_mode to the controllers' (a minibatch controller needs minibatch trials)."""
    modes = {}
    for name in names:
        scheduler = make_scheduler(name, proto)
        if name.partition("@")[0].partition("+")[0] == "qan":
            modes[name] = scheduler.action_mode
    if len(set(modes.values())) > 1:
        raise ValueError(f"the QAN controllers have different action modes {modes}; one "
                         "comparison must use one. Compare lr and minibatch controllers in "
                         "separate runs.")
    if modes and "action_mode" not in proto.task_config:
        proto.task_config["action_mode"] = next(iter(modes.values()))
    return next(iter(modes.values()), None)


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
    if base in LR_FREE or base in SEARCHERS:
        if stopper and stopper not in PLAIN_STOPPERS:
            raise ValueError(f"scheduler {name!r} is unknown: {base} goes alone or with a "
                             f"stopper, {base}+STOPPER with STOPPER in {PLAIN_STOPPERS} (e.g. "
                             f"{base}+asha).")
    elif stopper in TRIAL_SCHEDULES:
        if name not in SCHEDULED_NAMES:
            raise ValueError(f"scheduler {name!r} is unknown: +{stopper} goes with a scheduler "
                             "that only stops trials; use one of "
                             f"{', '.join(SCHEDULED_NAMES)}.")
    elif base not in BASE_SCHEDULERS or (stopper and (base != "qan" or stopper not in STOPPERS)):
        raise ValueError(f"scheduler {name!r} is unknown; use one of {BASE_SCHEDULERS}, "
                         f"qan+STOPPER with STOPPER in {STOPPERS} (e.g. qan+asha), one of "
                         f"{SCHEDULED_NAMES}, an LR-free optimizer {LR_FREE} (+STOPPER), or "
                         "tpe+asha (TPE search).")
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
                            action_mode=proto.task_config.get("action_mode"),
                            stopper=stopping(stopper, qan=True) if stopper else None,
                            guard=bool(proto.task_config.get("guard", True)))
    if base in LR_FREE or base in SEARCHERS:
        return stopping(stopper or "fifo")
    return stopping(base)


def searcher(name: str, proto: Protocol, seed: int):
    """The search algorithm of scheduler `name`: random search (BasicVariantGenerator seeded
    with `seed`) for all but tpe/tpe+STOPPER, which get Tune's OptunaSearch with a TPESampler
    seeded with `seed` (its first TPE_STARTUP of the trials random), both at most
    max_concurrent trials at a time."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    base = name.partition("@")[0].partition("+")[0]
    if base not in SEARCHERS:
        return BasicVariantGenerator(random_state=seed, max_concurrent=proto.max_concurrent)
    try:
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:
        raise ValueError(f"scheduler {name!r} needs the package 'optuna' ({err}). Install the "
                         "baselines extra: pip install -e \".[baselines]\" (or pip install "
                         "optuna).") from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = max(2, round(TPE_STARTUP * proto.samples))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=proto.max_concurrent)


def lr_free_keys(name: str, proto: Protocol) -> dict[str, Any]:
    """The trial-config keys of an LR-free scheduler name (others: {}): the optimizer of the
    task's family (qan_ray.lrfree.optimizer_for) and, for prodigy and dadapt, LR 1 with a
    cosine over the trial's epochs (schedulefree keeps the sampled LR, constant)."""
    base = name.partition("@")[0].partition("+")[0]
    if base not in LR_FREE:
        return {}
    from qan_ray import lrfree
    from qan_ray.config import _FIELDS
    from qan_ray.distribution import load_config

    # the task's own optimizer (the trainable keys of task_config are not config fields)
    task_optimizer = load_config({k: v for k, v in proto.task_config.items()
                                  if k in _FIELDS}).optimizer
    keys: dict[str, Any] = {"optimizer": lrfree.optimizer_for(base, task_optimizer)}
    if lrfree.RECIPES[base] != "fixed":
        keys.update(lr=1.0, trial_schedule=lrfree.RECIPES[base])
    return keys


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


def trial_schedule(name: str) -> str | None:
    """The per-trial LR schedule a scheduler name asks for (asha+cosine -> "cosine"), or None."""
    schedule = name.partition("@")[0].partition("+")[2]
    return schedule if schedule in TRIAL_SCHEDULES else None


def param_space(proto: Protocol, name: str | None = None) -> dict[str, Any]:
    """The trial configs: the task's fixed keys, the epochs, and the searched LR and init seed;
    for a BASE+SCHEDULE name also `trial_schedule` (a constant: the sampled LRs and seeds are
    those of BASE alone)."""
    from ray import tune

    space = {**proto.task_config, "epochs": proto.epochs,
             "lr": tune.loguniform(proto.lr_low, proto.lr_high),
             "seed": tune.randint(0, 1_000_000)}
    schedule = None if name is None else trial_schedule(name)
    if schedule is not None:
        space["trial_schedule"] = schedule
    if name is not None:
        space.update(lr_free_keys(name, proto))
    return space


def storage_uri(storage: str | Path) -> str:
    """Tune's storage_path: a cloud URI (s3://, gs://, ...) as given, a local path absolute."""
    text = str(storage)
    return text if "://" in text else str(Path(text).resolve())


def record_dir(out: str | Path, name: str, seed: int) -> Path:
    """The folder of one experiment's records under a command's --out."""
    return Path(out) / "experiments" / f"{re.sub(r'[^A-Za-z0-9_.]+', '-', name)}-s{seed}"


def fingerprint(name: str, proto: Protocol, seed: int) -> dict[str, Any]:
    """What must match for a finished experiment to be reused."""
    return {"scheduler": name, "seed": seed, "protocol": dataclasses.asdict(proto)}


def run_experiment(name: str, proto: Protocol, seed: int, storage: str | Path,
                   log=print, record: str | Path | None = None,
                   resume: bool = False) -> dict[str, Any]:
    """One Tune experiment with scheduler `name`; returns the summary row and the trace rows.
    With `record` (a folder), keeps experiment.json / rows.jsonl / summary.json there; with
    `resume`, continues the experiment recorded there (tune.Tuner.restore). Raises
    ExperimentInterrupted when Ctrl-C stopped it before it finished."""
    import ray
    from ray import tune

    from trainables.targets import trainable_for

    record = None if record is None else Path(record)
    rows_file = None if record is None else record / "rows.jsonl"
    trainable = tune.with_resources(trainable_for(proto.task_config.get("task", "digits-mlp")),
                                    {"cpu": proto.cpus_per_trial, "gpu": proto.gpus_per_trial})
    if resume:
        if record is None or not (record / "experiment.json").exists():
            raise FileNotFoundError(f"--resume: no experiment.json under {str(record)!r}; "
                                    "nothing to resume. Run without --resume.")
        from qan_ray.records import read_json

        saved = read_json(record / "experiment.json", "the experiment's Tune state",
                          "Run again without --resume.")
        if saved.get("fingerprint") != fingerprint(name, proto, seed):
            raise ValueError(f"--resume: the experiment in {str(record)!r} ran "
                             f"{saved.get('fingerprint')}, not these flags; they must match. "
                             "Resume with the flags it started with, or drop --resume.")
        path = saved["path"]
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    sigterm_as_sigint()  # after ray.init: SIGTERM stops the experiment as Ctrl-C does
    quiet_tune()
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: the Tune experiment {path!r} recorded in "
                                    f"{str(record)!r} has no restorable state; run again "
                                    "without --resume.")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   param_space=param_space(proto, name))
        exp_path = path
    else:
        scheduler = make_scheduler(name, proto)
        counter = epoch_counter(rows_file)
        tag = re.sub(r"[^A-Za-z0-9_.]+", "-", name)
        exp_name = f"{proto.task_config.get('task')}-{tag}-s{seed}-{time.time_ns()}"
        tuner = tune.Tuner(
            trainable, param_space=param_space(proto, name),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=proto.samples,
                search_alg=searcher(name, proto, seed),
                reuse_actors=True),
            run_config=tune.RunConfig(
                name=exp_name, storage_path=storage_uri(storage), verbose=0,
                stop=epoch_budget(counter, proto.budget), callbacks=[counter],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                failure_config=tune.FailureConfig(max_failures=0)))
        exp_path = f"{storage_uri(storage).rstrip('/')}/{exp_name}"
        if record is not None:
            from qan_ray.records import write_json

            record.mkdir(parents=True, exist_ok=True)
            if rows_file.exists():
                rows_file.unlink()
            write_json(record / "experiment.json",
                       {"path": exp_path, "fingerprint": fingerprint(name, proto, seed)})
    start = time.perf_counter()
    stop_seen = _StopSignalSeen()  # Tune logs its graceful stop, and fit() returns normally
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addHandler(stop_seen)
    main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main else None
    try:
        results = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C, or Tune's handler disabled
        rows = read_rows(rows_file) if rows_file else []
        raise ExperimentInterrupted(name, seed, rows[-1]["epochs"] if rows else 0.0,
                                    proto.budget, exp_path) from None
    finally:
        tune_log.removeHandler(stop_seen)
        if main:  # Tune leaves its handler in place: a later Ctrl-C must not be swallowed
            signal.signal(signal.SIGINT, sigint)
    wall = time.perf_counter() - start
    callback = _counter_of(tuner) if resume else counter
    rows = read_rows(rows_file) if rows_file else callback.rows
    if stop_seen.seen or (callback is not None and callback.interrupted.is_set()):
        raise ExperimentInterrupted(name, seed, rows[-1]["epochs"] if rows else 0.0,
                                    proto.budget, exp_path)
    errors = [str(r.error) for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{name} (seed {seed}): {len(errors)} trial(s) failed; first: "
                           f"{errors[0][:2000]}")
    summary = run_summary(name, seed, rows, trials=len(results), wall_s=wall,
                          budget=proto.budget)
    log(f"  {name:<14} seed {seed}: best val acc {summary['best_val_accuracy']:.4f}, "
        f"{summary['total_epochs']:.0f} epochs, {wall:.1f}s")
    if record is not None:
        from qan_ray.records import write_json

        write_json(record / "summary.json", {"summary": summary,
                                             "fingerprint": fingerprint(name, proto, seed)})
    return {"summary": summary, "rows": rows}


class _StopSignalSeen(logging.Handler):
    """Notes Tune's "Stop signal received" warning (its SIGINT/SIGUSR1 graceful stop)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Stop signal received"):
            self.seen = True


def _counter_of(tuner):
    """The EpochCounter a restored Tuner runs with (Tune unpickled it from the experiment)."""
    try:
        callbacks = tuner._local_tuner.get_run_config().callbacks or []
    except AttributeError:
        return None
    return next((c for c in callbacks if hasattr(c, "interrupted")), None)
