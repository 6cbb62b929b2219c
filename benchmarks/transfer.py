"""Transfer of a task-distribution ("generalist") controller to the families held out of its
meta-training: the 2-D CNN on digits (`digits-cnn`) and the MNIST-1D MLP (`mnist1d-mlp`).

Nothing here is tuned on the held-out tasks: every task is its preset (model, data, optimizer,
batch size, epochs), the controller's control problem (actions, LR schedule, bounds, observation)
is read from its spec, and one decision per epoch is what the generalist was trained with
(`control_interval` = the task's mini-batches per epoch, as `qan_ray.distribution.sample_task`
sets it).

(a) `qan evaluate`-style, through the same `TargetTrainingEnv` for every method (library pieces:
qan_ray.evaluate.run_controller / run_schedule / Runs / summarise, qan_ray.control baselines):
the greedy controller vs fixed, cosine, plateau (ReduceLROnPlateau) and hypergradient, each from
the same start LRs: three one decade apart inside the task's optimizer family range
(qan_ray.distribution.LR_RANGES) plus a dying start at half the range's top (0.5 for the SGD
families: most runs from there die without help); a fixed-LR grid at half-decade spacing over that
whole range gives the best fixed LR in hindsight (the regret reference). Evaluation seeds
1,000,000 + i (never used in meta-training). The controller runs with its rescue guard (`qan`,
cfg.guard from its spec, on by default) and without it (`qan (no guard)`: the same controller,
cfg.guard=False); baselines run unguarded (qan_ray.evaluate.baseline_config). Per cell: final
accuracy, dead runs (final val accuracy within 5 points of chance, constants.is_dead) and rescues.
With --old-controller, another controller (e.g. the previous built-in with actions x0.5..x2) runs
guarded as `qan-old`; with --signals-controller, a signals-only controller (`--no-weight-
features`) runs too, for the weight-statistics ablation.

(b) `qan compare`-style (qan_ray.compare.compare, protocol qan_ray/protocol.py): qan@CONTROLLER,
qan+asha@CONTROLLER vs asha, pbt, fifo (and asha+cosine when the scheduler factory accepts it),
8 trials x the preset's epochs (--tune-epochs TASK=N to cut a long preset for compute), LR
log-uniform over 1e-3..1 (TUNE_LR_RANGE, clipped to the optimizer family range: the range a Tune
user searches, where some trials die), >= 5 seeds; `qan (no guard)` is the qan scheduler with
task_config {"guard": False} (`qan compare --no-guard`), recorded under tune_TASK_noguard. Per
experiment also the per-trial measures of qan_ray.summaries.run_summary: mean final val accuracy
over all trials, dead trials, rescues.

The result file ends with the goal numbers of "No dead trials": `dead_trials_qan` (dead trials of
the guarded QAN scheduler over all held-out Tune experiments), `trial_mean_vs_pbt` (the smaller
over the held-out tasks of QAN's per-trial mean final val accuracy minus PBT's) and `cells_won`
(held-out (task, start) cells of (a) where the guarded controller's mean final val accuracy is >=
the best baseline's from the same start).

Writes benchmarks/results/transfer.md, transfer_eval.parquet (one row per method, start, seed),
transfer_curves.parquet (every control step), transfer_tune.parquet (one row per scheduler,
seed, task) and transfer_lr_paths.png. Intermediate results are cached under --work, so an
interrupted run continues where it stopped.

Usage:
  python benchmarks/transfer.py --quick --controller builtin            (a smoke run, minutes)
  python benchmarks/transfer.py --controller runs/generalist/run/controller \\
      --tune-epochs mnist1d-mlp=20 [--in-distribution] [--old-controller policies/builtin] \\
      [--signals-controller runs/generalist_signals/run/controller]
  --part eval | tune | report runs one part (e.g. eval and tune in separate processes, one
  Tune process per task with --tasks), then `--part report` with the same flags writes the
  result file from the cached episodes and recorded experiments.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from qan_ray.config import TASK_PRESETS, QANConfig, from_dict  # noqa: E402
from qan_ray.constants import is_dead  # noqa: E402
from qan_ray.distribution import (  # noqa: E402
    LR_RANGES,
    TASK_FIELDS,
    batches_per_epoch,
    optimizer_family,
)
from qan_ray.summaries import mean_sd  # noqa: E402

HELD_OUT = ("digits-cnn", "mnist1d-mlp")
IN_DISTRIBUTION = "digits-mlp"  # seen in training (the generalist's digits/MLP family)
BASELINES = ("fixed", "cosine", "plateau", "hypergradient")
LR_FREE = ("prodigy", "schedulefree", "dadapt")  # qan_ray.lrfree.METHODS: (a) rows, no start LR
EXTRA_TUNE = ("tpe+asha", "prodigy", "schedulefree")
"""Part (b)'s rows of what users pick instead (TPE search with ASHA, LR-free optimizers): measured
against the targets of the original baselines and kept out of the best-baseline numbers, so the
goal lines of the earlier runs keep their meaning."""
TUNE_SCHEDULERS = ("qan", "qan+asha", "asha", "pbt", "fifo")
OPTIONAL_SCHEDULERS = ("asha+cosine",)
NOGUARD = "qan (no guard)"  # the controller with cfg.guard=False (a and b)
NOGUARD_TUNE = "qan-noguard"  # its --schedulers name: qan@CONTROLLER, task_config guard False
OLD = "qan-old"  # --old-controller, guarded
SIGNALS = "qan-signals"  # --signals-controller
TUNE_LR_RANGE = (1e-3, 1.0)  # part (b): what a Tune user searches (some trials die)
DYING_START = 0.5  # part (a): the extra start, x the family range's top
_KEEP = ("step", "batches", "lr", "val_accuracy", "val_loss", "train_loss", "action", "rescued",
         "rescues")  # what the cache keeps of each control step
RESULTS = ROOT / "benchmarks" / "results"


# --- configs -------------------------------------------------------------------------------------
@functools.cache
def load(path: str):
    """The controller at `path` (loaded once: `qan` and `qan (no guard)` share it)."""
    from policies.qnet import load_controller

    return load_controller(path)


def controller_id(path: str) -> str:
    """The controller folder plus a hash of its weights (cache key: a retrained controller in the
    same folder is a new controller)."""
    from policies.qnet import BUILTIN, WEIGHTS_FILE

    folder = BUILTIN if path == "builtin" else Path(path)
    if (folder / "controller").is_dir() and not (folder / WEIGHTS_FILE).exists():
        folder = folder / "controller"
    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
    return f"{path}#{digest}"


def task_config(controller, task: str, lr: float, epochs: str | None = None) -> QANConfig:
    """The preset `task` under the controller's control problem: every field the controller
    trained with except the task's own (qan_ray.distribution.TASK_FIELDS), one decision per epoch
    (as the generalist's sampled tasks), start LR `lr`, on the CPU."""
    trained = controller.spec.task
    shared = {k: v for k, v in trained.items() if k not in TASK_FIELDS and k != "device"}
    cfg = from_dict({**shared, "task": task, "lr": lr, "device": "cpu"})
    if epochs is not None:
        cfg = cfg.replace(epochs_per_episode=float(tune_epochs(epochs, task)))
    return cfg.replace(control_interval=batches_per_epoch(cfg))


def method_config(args, name: str, ctrl, task: str, lr: float) -> QANConfig:
    """The env config of controller `name` (task_config), with its rescue guard on, or off for
    the ablation NOGUARD (args.guards)."""
    return task_config(ctrl, task, lr, args.epochs).replace(guard=args.guards.get(name, True))


def start_lrs(task: str) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(the start LRs: 3 one decade apart inside the family range plus the dying start
    DYING_START x the range's top (0.001, 0.01, 0.1, 0.5 for the SGD families), the fixed-LR grid
    at half-decade spacing over the whole range, the family)."""
    family = optimizer_family(from_dict(task=task))
    low, high = LR_RANGES[family]
    decades = math.log10(high / low)
    mid = math.sqrt(low * high)
    starts = tuple(sorted({*(_round(mid * 10.0 ** k) for k in (-1, 0, 1)),
                           float(f"{DYING_START * high:.1g}")}))
    grid = tuple(_round(low * 10.0 ** (i / 2)) for i in range(int(round(2 * decades)) + 1))
    return starts, grid, family


def _round(x: float) -> float:
    """x on the half-decade grid 1, 3, 10, 30, ... x 10^k (one significant digit)."""
    return float(f"{10.0 ** (round(2 * math.log10(x)) / 2):.1g}")


# --- (a) evaluation through the env ------------------------------------------------------------
KEY_FIELDS = (
    "task tasks holdout dataset data_root download val_fraction data_seed max_train_samples "
    "augment model hidden wrn_depth wrn_width optimizer lr lr_init_range momentum nesterov "
    "weight_decay batch_size epochs_per_episode amp action_mode control_interval lr_factors "
    "restart_lr lr_schedule lr_min lr_max focus_share reward reward_scale target_accuracy "
    "divergence_factor divergence_penalty chance_penalty chance_step_penalty guard "
    "rescue_factor rescue_penalty max_rescues mm_coef mm_active_fraction mm_reference "
    "weight_features monitored_layers val_max_samples seed device").split()
"""The QANConfig fields the cache has been keyed by since its first runs. A field added to
QANConfig later joins an episode's key only where it differs from its default, so adding a field
keeps every cached episode (whose runs it does not change) valid."""


def cfg_key(cfg: QANConfig) -> dict:
    """The config part of an episode's cache key (KEY_FIELDS, plus later fields off their
    default)."""
    import dataclasses

    defaults = {f.name: (f.default_factory() if f.default is dataclasses.MISSING
                         and f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(QANConfig)}
    return {k: v for k, v in cfg.to_dict().items() if k in KEY_FIELDS or v != defaults[k]}


class Cache:
    """One JSON line per finished episode, keyed by everything that decides it."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                self.rows[row["key"]] = row

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        row = {"key": key, **row}
        self.rows[key] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def episode(cache: Cache, env_cfg: QANConfig, method: str, lr: float, seed: int, act_id: str,
            run, log) -> dict:
    """One cached episode: `run(env, seed) -> records` on a TargetTrainingEnv of `env_cfg`."""
    from qan_ray.env import TargetTrainingEnv
    from qan_ray.evaluate import Runs

    key = cache.key(cfg_key(env_cfg), method, act_id, seed)
    hit = cache.get(key)
    if hit is not None:
        return hit
    env = _env(env_cfg, TargetTrainingEnv)
    t = time.perf_counter()
    recs = run(env, seed)
    runs = Runs()
    runs.add(method, seed, recs, env, time.perf_counter() - t)
    r = runs.by_method[method][0]
    row = {"method": method, "lr0": lr, "seed": seed,
           "final_val_accuracy": r["final_val_accuracy"],
           "test_accuracy": r["test_accuracy"], "wall_s": r["wall_s"], "diverged": r["diverged"],
           "rescues": int(recs[-1].get("rescues", 0)),
           "recs": [{k: v for k, v in x.items() if k in _KEEP} for x in recs]}
    cache.put(key, row)
    rescues = f" rescues {row['rescues']}" if row["rescues"] else ""
    log(f"    {method:<16} lr0 {lr:<7g} seed {seed}: val {row['final_val_accuracy']:.4f} "
        f"test {row['test_accuracy']:.4f}{' DIVERGED' if row['diverged'] else ''}"
        f"{' DEAD' if is_dead(row['final_val_accuracy']) else ''}{rescues} "
        f"({row['wall_s']:.1f}s)")
    return row


_ENVS: dict[str, Any] = {}


def _env(cfg: QANConfig, cls):
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=list)
    if key not in _ENVS:
        if len(_ENVS) > 8:
            _ENVS.clear()
        _ENVS[key] = cls(cfg)
    return _ENVS[key]


def run_eval(args, controllers: dict[str, Any], tasks: list[str], log) -> list[dict]:
    """Every (task, method, start, seed) episode of part (a); returns the rows."""
    from qan_ray.evaluate import baseline_config, eval_seeds, run_controller, run_schedule

    cache = Cache(Path(args.work) / "eval_cache.jsonl")
    seeds = eval_seeds(args.seeds)
    rows = []
    for task in tasks:
        starts, grid, family = start_lrs(task)
        ref = next(iter(controllers.values()))
        log(f"(a) {task}: starts {starts}, fixed grid {grid} ({family} range "
            f"{LR_RANGES[family]}), {len(seeds)} seeds, "
            f"{task_config(ref, task, starts[0], args.epochs).epochs_per_episode:g} epochs")
        for name, ctrl in controllers.items():
            for lr in starts:
                cfg = method_config(args, name, ctrl, task, lr)
                ctrl.spec.check_fits(_observation(cfg), f"task {task!r}")
                for seed in seeds:
                    row = episode(cache, cfg, name, lr, seed, args.ids[name],
                                  lambda env, s, c=ctrl: run_controller(env, c, s), log)
                    rows.append({**row, "task": task})
        bcfg_of = {lr: baseline_config(task_config(ref, task, lr, args.epochs))
                   for lr in sorted({*starts, *grid})}
        for base in BASELINES:
            lrs = sorted({*starts, *grid}) if base == "fixed" else starts
            if base in POPULATION_BASELINES and args.population_baselines:
                rows += population_episodes(cache, bcfg_of, base, lrs, seeds, task, log)
                continue
            for lr in lrs:
                for seed in seeds:
                    row = episode(cache, bcfg_of[lr], base, lr, seed, base,
                                  lambda env, s, b=base, x=lr: run_schedule(env, b, x, s), log)
                    rows.append({**row, "task": task})
        rows += lr_free_rows(cache, args, ref, task, seeds, log, compute=True)
    return rows


def lr_free_rows(cache: Cache, args, ref, task: str, seeds: list[int], log,
                 compute: bool) -> list[dict]:
    """Part (a)'s LR-free rows of `task` (qan_ray.evaluate.lr_free_config, through the same env
    and trainer, K = 1): prodigy and dadapt at LR 1 with cosine, schedulefree at every LR of its
    grid, one episode per seed (`compute`: run the missing ones; else read the cache only).
    They ignore the start LR, so each episode serves every start cell: one row per (start,
    seed) with lr0 the start and `lr` the optimizer's LR; schedulefree keeps the LR of its grid
    with the best mean final val accuracy over the seeds (in hindsight, labelled so)."""
    from qan_ray import lrfree
    from qan_ray.evaluate import lr_free_config, run_schedule

    starts, _, _ = start_lrs(task)
    base_cfg = task_config(ref, task, starts[0], args.epochs)
    out = []
    for method in LR_FREE:
        if compute and lrfree.missing((method,)):
            log(f"    {method}: skipped ({lrfree.INSTALL})")
            continue
        by_lr = {}
        for lr in lrfree.lr_grid(method, base_cfg.optimizer):
            cfg = lr_free_config(base_cfg, method, lr)
            got = []
            for seed in seeds:
                key = cache.key(cfg_key(cfg), method, "lr-free", seed)
                if compute and cache.get(key) is None:
                    episode(cache, cfg, method, lr, seed, "lr-free",
                            lambda env, s, m=method, x=lr: run_schedule(
                                env, lrfree.RECIPES[m], x, s), log)
                hit = cache.get(key)
                if hit is not None:
                    got.append(hit)
            if got:
                by_lr[lr] = got
        if not by_lr:
            continue
        best = max(by_lr, key=lambda lr: statistics.fmean(r["final_val_accuracy"]
                                                           for r in by_lr[lr]))
        grid = ", ".join(f"{lr:g}" for lr in by_lr)
        label = (f"{method}@{best:g} (best of LR {grid})" if len(by_lr) > 1
                 else f"{method}@{best:g}, cosine")
        for lr0 in starts:
            out += [{**{k: v for k, v in r.items() if k != "key"}, "method": method,
                     "label": label, "lr": best, "lr0": lr0, "task": task} for r in by_lr[best]]
    return out


POPULATION_BASELINES = ("fixed", "cosine")  # schedules: qan_ray.control.run_schedules


def baseline_key(cache: Cache, cfg: QANConfig, base: str, seed: int, population: bool) -> str:
    return cache.key(cfg_key(cfg), base, base + ("@population" if population else ""), seed)


def population_episodes(cache: Cache, bcfg_of: dict, base: str, lrs, seeds, task: str,
                        log) -> list[dict]:
    """`base` from every LR x seed as one population (qan_ray.control.run_schedules, what
    `qan evaluate --population-baselines` runs); cached per member."""
    from qan_ray.control import run_schedules

    todo = [(base, lr, seed) for lr in lrs for seed in seeds
            if cache.get(baseline_key(cache, bcfg_of[lr], base, seed, True)) is None]
    if todo:
        t = time.perf_counter()
        records, test_acc = run_schedules(bcfg_of[lrs[0]], todo)
        sec = (time.perf_counter() - t) / len(todo)
        for (_, lr, seed), recs, acc in zip(todo, records, test_acc):
            recs[0]["lr"] = lr  # step 0: the population's LR before the schedule's first set
            row = {"method": base, "lr0": lr, "seed": seed,
                   "final_val_accuracy": recs[-1]["val_accuracy"], "test_accuracy": float(acc),
                   "wall_s": sec, "diverged": any(r.get("diverged") for r in recs),
                   "rescues": 0, "population": True,
                   "recs": [{k: v for k, v in x.items() if k in _KEEP} for x in recs]}
            cache.put(baseline_key(cache, bcfg_of[lr], base, seed, True), row)
        log(f"    {base}: {len(todo)} members as one population, {sec:.2f}s per member")
    return [{**cache.get(baseline_key(cache, bcfg_of[lr], base, seed, True)), "task": task}
            for lr in lrs for seed in seeds]


def _observation(cfg: QANConfig):
    from qan_ray.contract import observation_spec

    return observation_spec(cfg)


# --- (b) Tune comparison -------------------------------------------------------------------------
def tune_names(controller: str, proto, only: str | None = None) -> list[str]:
    """The schedulers of part (b) (`only`: a comma-separated subset of their base names;
    NOGUARD_TUNE stands for the qan scheduler without the guard, see tune_groups)."""
    from qan_ray import lrfree
    from qan_ray.protocol import make_scheduler

    names = [*TUNE_SCHEDULERS, NOGUARD_TUNE]
    for extra in (*OPTIONAL_SCHEDULERS, *EXTRA_TUNE):
        try:
            make_scheduler(extra, proto)
        except ValueError:
            continue
        if extra in lrfree.METHODS and lrfree.missing((extra,)):
            continue
        names.append(extra)
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"--schedulers names {unknown}; choose from {names}.")
        names = [n for n in names if n in wanted]
    return [f"{n}@{controller}" if n.startswith("qan") else n for n in names]


def tune_protocol(task: str, args, guard: bool = True):
    """The Tune protocol of `task`: LR log-uniform over TUNE_LR_RANGE (inside the family's
    range); guard=False puts {"guard": False} into the task config (`qan compare --no-guard`:
    the QAN scheduler's guard off; the baselines have none either way)."""
    from qan_ray.protocol import Protocol

    _, _, family = start_lrs(task)
    low, high = LR_RANGES[family]
    epochs = tune_epochs(args.tune_epochs, task)
    config = {"task": task, "device": "cpu", **({} if guard else {"guard": False})}
    return Protocol(task_config=config, samples=args.tune_samples,
                    epochs=epochs, lr_low=max(TUNE_LR_RANGE[0], low),
                    lr_high=min(TUNE_LR_RANGE[1], high), max_concurrent=2,
                    cpus_per_trial=1.0, policy=args.controller)


def tune_groups(args, task: str) -> list[tuple[list[str], Any, Path, str | None]]:
    """The `qan compare` runs of part (b) on `task`: (scheduler names, protocol, folder, label):
    every scheduler under tune_TASK, and NOGUARD's (the qan scheduler under a protocol with the
    guard off) under tune_TASK_noguard, labelled NOGUARD in the report."""
    proto = tune_protocol(task, args)
    names = tune_names(args.controller, proto, args.schedulers)
    main = [n for n in names if not n.startswith(NOGUARD_TUNE)]
    groups = [(main, proto, Path(args.work) / f"tune_{task}", None)] if main else []
    if len(main) < len(names):
        groups.append(([f"qan@{args.controller}"], tune_protocol(task, args, guard=False),
                       Path(args.work) / f"tune_{task}_noguard", NOGUARD))
    return groups


def tune_epochs(text: str | None, task: str) -> int:
    """Epochs per trial: "N" for every task, "TASK=N,..." per task; default the preset's."""
    for part in (text or "").split(","):
        name, eq, value = part.strip().rpartition("=")
        if value and (not eq or name == task):
            return int(value)
    return int(math.ceil(TASK_PRESETS[task]["epochs_per_episode"]))


def run_tune(args, tasks: list[str], log) -> None:
    """`qan compare` on every task (finished experiments under --work are reused)."""
    import ray

    from qan_ray.compare import compare

    try:
        for task in tasks:
            for names, proto, out, label in tune_groups(args, task):
                log(f"(b) {task}{f' [{label}]' if label else ''}: {names}, seeds "
                    f"{args.tune_seeds}, {proto.samples} trials x {proto.epochs} epochs (budget "
                    f"{proto.budget}), LR in [{proto.lr_low:g}, {proto.lr_high:g}], guard "
                    f"{'off' if proto.task_config.get('guard') is False else 'on'} -> {out}")
                seeds = ([int(x) for x in args.run_tune_seeds.split(",")]
                         if args.run_tune_seeds else list(range(args.tune_seeds)))
                compare(names, proto, seeds, out, log=log)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def collect_tune(args, task: str) -> list[dict]:
    """Part (b)'s summaries of `task` from the experiments recorded under --work: per group,
    every seed whose experiments all finished (targets per seed from the baselines, as `qan
    compare` sets them; NOGUARD's runs are measured against the same targets)."""
    from qan_ray.compare import finished_run
    from qan_ray.protocol import align_action_mode
    from qan_ray.summaries import add_targets, epochs_to_target

    runs, extra, budget = [], [], None
    for names, proto, out, label in tune_groups(args, task):
        alone = copy.deepcopy(proto)  # EXTRA_TUNE run without a qan name: no action_mode set
        align_action_mode(names, proto)  # what compare() does to the protocol before it runs
        budget = proto.budget if budget is None else budget
        core = [n for n in names if _short(n) not in EXTRA_TUNE]
        for seed in range(args.tune_seeds):
            done = [finished_run(out, name, proto, seed) for name in core]
            if all(d is not None for d in done):
                runs += [d if label is None else {**d, "summary": {**d["summary"],
                                                                   "scheduler": label}}
                         for d in done]
            extra += [d for d in (_finished_either(out, name, (proto, alone), seed)
                                  for name in names if name not in core) if d is not None]
    summaries = add_targets(runs, 1.0)
    # EXTRA_TUNE: the targets of the original baselines, per seed (they do not move them)
    targets = {s["seed"]: s["target_accuracy"] for s in summaries}
    summaries += [dict(d["summary"], target_accuracy=targets[d["summary"]["seed"]],
                       epochs_to_target=epochs_to_target(d["rows"],
                                                         targets[d["summary"]["seed"]]))
                  for d in extra if d["summary"]["seed"] in targets]
    return [{**s, "task": task, "budget": budget, "scheduler": _short(s["scheduler"])}
            for s in summaries]

def _finished_either(out: Path, name: str, protos, seed: int) -> dict | None:
    """finished_run under the first of `protos` its record matches (an EXTRA_TUNE experiment
    run beside a qan scheduler carries the controller's action_mode in its protocol, one run
    alone does not; the trials are the same)."""
    from qan_ray.compare import finished_run

    for i, proto in enumerate(protos):
        try:
            return finished_run(out, name, proto, seed)
        except ValueError:
            if i == len(protos) - 1:
                raise
    return None


def _short(name: str) -> str:
    return name.partition("@")[0]


# --- report --------------------------------------------------------------------------------------
def _ms(values, fmt=".4f", scale=1.0) -> str:
    m, s = mean_sd([v * scale for v in values])
    return "n/a" if math.isnan(m) else f"{m:{fmt}} ± {s:{fmt}}"


def eval_tables(rows: list[dict], tasks: list[str], controllers: list[str]) -> tuple[str, dict]:
    """Markdown for part (a) and the goal numbers."""
    lines, goal = [], {"met_val": True, "met_test": True, "regret": [], "delta": {}, "per": [],
                       "cells": [], "lr_free": []}
    for task in tasks:
        starts, grid, family = start_lrs(task)
        mine = [r for r in rows if r["task"] == task]
        by = {}
        for r in mine:
            by.setdefault((r["method"], r["lr0"]), []).append(r)
        fixed = {lr: by[("fixed", lr)] for lr in grid if ("fixed", lr) in by}
        if not fixed:
            continue
        best_lr = max(fixed, key=lambda lr: mean_sd([r["final_val_accuracy"]
                                                     for r in fixed[lr]])[0])
        best_val = mean_sd([r["final_val_accuracy"] for r in fixed[best_lr]])[0]
        best_test = mean_sd([r["test_accuracy"] for r in fixed[best_lr]])[0]
        n = len(fixed[best_lr])
        lines += [f"### {task} (held out)" if task in HELD_OUT else
                  f"### {task} (SEEN in training: in-distribution reference)", "",
                  f"Starts {', '.join(f'{s:g}' for s in starts)} (three one decade apart inside "
                  f"the {family} range {LR_RANGES[family]}, plus the dying start "
                  f"{DYING_START:g} x its top); {n} seeds; best fixed LR in hindsight "
                  f"(grid {', '.join(f'{g:g}' for g in grid)}): **{best_lr:g}**, final val "
                  f"{best_val:.4f}, test {best_test:.4f}.", "",
                  "| start LR | method | final val acc | test acc | diverged | dead runs | "
                  "rescues | val regret vs best fixed (pts) |",
                  "|---|---|---|---|---|---|---|---|"]
        for lr in starts:
            methods = [*controllers, *BASELINES, *LR_FREE]
            present = [m for m in methods if (m, lr) in by]
            free_val = {m: mean_sd([r["final_val_accuracy"] for r in by[(m, lr)]])[0]
                        for m in LR_FREE if (m, lr) in by}
            best_f = max(free_val, key=free_val.get) if free_val else None
            base_val = {m: mean_sd([r["final_val_accuracy"] for r in by[(m, lr)]])[0]
                        for m in BASELINES if (m, lr) in by}
            base_test = {m: mean_sd([r["test_accuracy"] for r in by[(m, lr)]])[0]
                         for m in BASELINES if (m, lr) in by}
            best_b = max(base_val, key=base_val.get)
            best_bt = max(base_test, key=base_test.get)
            for m in present:
                rs = by[(m, lr)]
                val = [r["final_val_accuracy"] for r in rs]
                regret = (best_val - statistics.fmean(val)) * 100
                mark = (" (best baseline)" if m == best_b else
                        " (best LR-free)" if m == best_f else "")
                name = rs[0].get("label", m)
                lines.append(f"| {lr:g} | {name}{mark} | {_ms(val)} | "
                             f"{_ms([r['test_accuracy'] for r in rs])} | "
                             f"{sum(r['diverged'] for r in rs)}/{len(rs)} | "
                             f"{_dead(rs)}/{len(rs)} | {_rescues(rs)} | {regret:+.2f} |")
            for c in controllers:
                if (c, lr) not in by:
                    continue
                cv = mean_sd([r["final_val_accuracy"] for r in by[(c, lr)]])[0]
                ct = mean_sd([r["test_accuracy"] for r in by[(c, lr)]])[0]
                paired = _paired(by[(c, lr)], by[(best_b, lr)], "final_val_accuracy")
                per = {"task": task, "controller": c, "lr0": lr, "qan_val": cv, "qan_test": ct,
                       "dead": _dead(by[(c, lr)]), "rescues": _rescues(by[(c, lr)]),
                       "runs": len(by[(c, lr)]),
                       "best_baseline": best_b, "best_baseline_val": base_val[best_b],
                       "best_baseline_test_method": best_bt,
                       "best_baseline_test": base_test[best_bt],
                       "met_val": cv >= base_val[best_b], "met_test": ct >= base_test[best_bt],
                       "regret_val_pts": (best_val - cv) * 100,
                       "regret_test_pts": (best_test - ct) * 100, "paired_val_pts": paired,
                       "best_lr_free": (by[(best_f, lr)][0].get("label", best_f)
                                        if best_f else None),
                       "best_lr_free_val": free_val.get(best_f, math.nan)}
                goal["per"].append(per)
                if c == controllers[0] and task in HELD_OUT and best_f is not None:
                    goal["lr_free"].append(cv - free_val[best_f])
                if c == controllers[0] and task in HELD_OUT:
                    goal["met_val"] &= per["met_val"]
                    goal["met_test"] &= per["met_test"]
                    goal["regret"].append(per["regret_val_pts"])
                    goal["cells"].append(per["met_val"])
        lines.append("")
    lines += ["Goal (a), per start: controller's mean final accuracy >= the best baseline's "
              "(fixed, cosine, plateau, hypergradient) from the same start LR. Paired difference "
              "over the same seeds (controller - best baseline, val, points):", "",
              "| task | controller | start LR | best baseline (val) | controller - best (val pts, "
              "paired mean ± sd) | val met | test met | dead runs | rescues | regret vs best "
              "fixed (val / test pts) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in goal["per"]:
        m, s = p["paired_val_pts"]
        lines.append(f"| {p['task']}{'' if p['task'] in HELD_OUT else ' (seen)'} | "
                     f"{p['controller']} | {p['lr0']:g} | {p['best_baseline']} "
                     f"{p['best_baseline_val']:.4f} | {m:+.2f} ± {s:.2f} | "
                     f"{'yes' if p['met_val'] else 'no'} | {'yes' if p['met_test'] else 'no'} | "
                     f"{p['dead']}/{p['runs']} | {p['rescues']} | "
                     f"{p['regret_val_pts']:+.2f} / {p['regret_test_pts']:+.2f} |")
    lines += ["", dead_table(rows, tasks, controllers)]
    return "\n".join(lines) + "\n", goal


def _dead(rs: list[dict]) -> int:
    return sum(is_dead(r["final_val_accuracy"]) for r in rs)


def _rescues(rs: list[dict]) -> int:
    return sum(int(r.get("rescues", 0)) for r in rs)


def dead_table(rows: list[dict], tasks: list[str], controllers: list[str]) -> str:
    """Dead runs and rescues per method and start over the held-out tasks (part (a))."""
    held = [t for t in tasks if t in HELD_OUT]
    starts = sorted({lr for t in held for lr in start_lrs(t)[0]})
    mine = [r for r in rows if r["task"] in held and r["lr0"] in starts]
    methods = [m for m in (*controllers, *BASELINES, *LR_FREE)
               if any(r["method"] == m for r in mine)]
    if not methods:
        return ""
    lines = [f"Dead runs (final val accuracy within 5 points of chance) / runs over the held-out "
             f"tasks ({', '.join(held)}), per start LR; rescues in all of them:", "",
             "| method | " + " | ".join(f"start {lr:g}" for lr in starts) + " | all | rescues |",
             "|---|" + "---|" * (len(starts) + 2)]
    for m in methods:
        rs = [r for r in mine if r["method"] == m]
        cells = [[r for r in rs if r["lr0"] == lr] for lr in starts]
        lines.append(f"| {m} | " + " | ".join(f"{_dead(c)}/{len(c)}" for c in cells)
                     + f" | {_dead(rs)}/{len(rs)} | {_rescues(rs)} |")
    return "\n".join(lines) + "\n"


def _paired(a: list[dict], b: list[dict], key: str) -> tuple[float, float]:
    bs = {r["seed"]: r[key] for r in b}
    return mean_sd([(r[key] - bs[r["seed"]]) * 100 for r in a if r["seed"] in bs])


def ablation_table(goal: dict, controllers: list[str], b: str = SIGNALS, a: str = "qan",
                   verdict: bool = True) -> str:
    """Controller `a` vs `b` per (task, start): val accuracy, dead runs, rescues; with `verdict`,
    the weight-statistics reading (a: weights + signals, b: signals only)."""
    if b not in controllers or a not in controllers:
        return {SIGNALS: "No signals-only controller was given (--signals-controller), so the "
                         "weight-statistics ablation is not in this run.\n",
                OLD: "No --old-controller was given, so the old action set is not compared in "
                     "this run.\n"}.get(b, f"{b} did not run.\n")
    lines = [f"| task | start LR | {a} val | {b} val | {a} - {b} (pts) | dead {a} / {b} | "
             f"rescues {a} / {b} |", "|---|---|---|---|---|---|---|"]
    diffs = []
    for p in goal["per"]:
        if p["controller"] != a:
            continue
        q = next((x for x in goal["per"] if x["controller"] == b and x["task"] == p["task"]
                  and x["lr0"] == p["lr0"]), None)
        if q is None:
            continue
        d = (p["qan_val"] - q["qan_val"]) * 100
        if p["task"] in HELD_OUT:
            diffs.append(d)
        lines.append(f"| {p['task']} | {p['lr0']:g} | {p['qan_val']:.4f} | {q['qan_val']:.4f} | "
                     f"{d:+.2f} | {p['dead']}/{p['runs']} / {q['dead']}/{q['runs']} | "
                     f"{p['rescues']} / {q['rescues']} |")
    mean = statistics.fmean(diffs) if diffs else math.nan
    median = statistics.median(diffs) if diffs else math.nan
    wins = sum(d > 0 for d in diffs)
    if not verdict:
        lines += ["", f"Held-out tasks and starts: {a} - {b} = {mean:+.2f} val points on average, "
                  f"median {median:+.2f}; {a} is ahead in {wins} of {len(diffs)} (task, start) "
                  "cells."]
        return "\n".join(lines) + "\n"
    lines += ["", f"Held-out tasks and starts: weights - signals-only = {mean:+.2f} val points on "
              f"average, median {median:+.2f}; the weight statistics are ahead in {wins} of "
              f"{len(diffs)} (task, start) cells. "
              + ("Weights help on this evidence." if mean > 0 and wins > len(diffs) / 2 else
                 "Weights do not pay for themselves on this evidence." if mean <= 0
                 and wins <= len(diffs) / 2 else
                 "Mixed: the mean and the majority of cells disagree (one large cell dominates "
                 "the mean); see the analysis below.")]
    return "\n".join(lines) + "\n"


def _trial_mean(r: dict) -> float:
    v = r.get("trial_mean_final_val_accuracy")
    return math.nan if v is None else float(v)


def tune_tables(rows: list[dict], tasks: list[str]) -> tuple[str, dict]:
    lines, ratios, deltas, flags = [], {"asha": [], "pbt": []}, [], []
    extra: dict[str, dict] = {}  # task -> QAN's and EXTRA_TUNE's mean best val accuracy
    dead_by: dict[str, int] = {}  # scheduler -> dead trials over the tasks
    trials_by: dict[str, int] = {}
    both = {"asha": [], "pbt": []}  # seeds where QAN and the baseline both reached the target
    per_task = {}
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        budget = mine[0]["budget"]
        names = list(dict.fromkeys(r["scheduler"] for r in mine))
        trials = mine[0]["trials"]
        lines += [f"### {task}", "", f"{len({r['seed'] for r in mine})} seeds (trial-config "
                  f"seeds {sorted({r['seed'] for r in mine})}); {trials} trials x "
                  f"{budget // max(trials, 1)} epochs, budget {budget} epochs per experiment; "
                  f"target = the best baseline's best val accuracy per seed; an experiment that "
                  f"never reaches it counts as the full budget ({budget}) and is flagged.", "",
                  "| scheduler | best val acc | final test acc (best finished trial) | mean final "
                  "val acc (all trials) | dead trials | rescues | epochs to target (reached) | "
                  "total epochs | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        n_seeds = len({r["seed"] for r in mine})
        for n in names:
            rs = [r for r in mine if r["scheduler"] == n]
            ett = [_ett(r) for r in rs]
            reached = sum(r["epochs_to_target"] is not None for r in rs)
            dead = sum(int(r.get("dead_trials", 0)) for r in rs)
            shown = n if len(rs) == n_seeds else f"{n} ({len(rs)} seeds)"
            lines.append(f"| {shown} | {_ms([r['best_val_accuracy'] for r in rs])} | "
                         f"{_ms([r['test_accuracy_best_finished'] for r in rs])} | "
                         f"{_ms([_trial_mean(r) for r in rs])} | "
                         f"{dead}/{sum(int(r['trials']) for r in rs)} | "
                         f"{sum(int(r.get('rescues', 0)) for r in rs)} | "
                         f"{_ms(ett, '.1f')} ({reached}/{len(rs)}) | "
                         f"{_ms([r['total_epochs'] for r in rs], '.1f')} | "
                         f"{_ms([r['wall_s'] for r in rs], '.1f')} |")
            dead_by[n] = dead_by.get(n, 0) + dead
            trials_by[n] = trials_by.get(n, 0) + sum(int(r["trials"]) for r in rs)
            for r in rs:
                if r["epochs_to_target"] is None:
                    flags.append(f"{task} {n} seed {r['seed']}")
        q = {r["seed"]: r for r in mine if r["scheduler"] == "qan"}
        for base in ("asha", "pbt"):
            for r in mine:
                if r["scheduler"] == base and r["seed"] in q:
                    ratios[base].append(_ett(q[r["seed"]]) / _ett(r))
                    if None not in (q[r["seed"]]["epochs_to_target"], r["epochs_to_target"]):
                        both[base].append(ratios[base][-1])
        final = {n: mean_sd([r["test_accuracy_best_finished"] for r in mine
                             if r["scheduler"] == n])[0] for n in names}
        bases = {n: v for n, v in final.items() if not n.startswith("qan")
                 and n not in EXTRA_TUNE}
        best_val = {n: mean_sd([r["best_val_accuracy"] for r in mine
                                if r["scheduler"] == n])[0] for n in names}
        if "qan" in best_val and any(n in EXTRA_TUNE for n in names):
            qan_by_seed = {r["seed"]: r["best_val_accuracy"] for r in mine
                           if r["scheduler"] == "qan"}
            others = {}
            for n in (n for n in names if n in EXTRA_TUNE):  # on the seeds both finished
                pairs = [(qan_by_seed[r["seed"]], r["best_val_accuracy"]) for r in mine
                         if r["scheduler"] == n and r["seed"] in qan_by_seed]
                if pairs:
                    others[n] = (statistics.fmean(q for q, _ in pairs),
                                 statistics.fmean(x for _, x in pairs), len(pairs))
            extra[task] = {"qan": best_val["qan"], "others": others}
        best = max(bases, key=bases.get)
        deltas.append((final["qan"] - bases[best]) * 100)
        trial_mean = {n: mean_sd([_trial_mean(r) for r in mine if r["scheduler"] == n])[0]
                      for n in names}
        per_task[task] = {"best_baseline": best, "delta_pts": deltas[-1],
                          "qan_plus_asha_delta_pts": (final.get("qan+asha", math.nan)
                                                      - bases[best]) * 100,
                          "trial_mean": trial_mean,
                          "trial_mean_vs_pbt": (trial_mean.get("qan", math.nan)
                                                - trial_mean.get("pbt", math.nan)),
                          "trial_mean_vs_fifo": (trial_mean.get("qan", math.nan)
                                                 - trial_mean.get("fifo", math.nan))}
        lines.append("")
    if flags:
        lines += ["Never reached the target (counted as the full budget): " + ", ".join(flags),
                  ""]
    for base in ("asha", "pbt"):
        b = both[base]
        lines.append(f"QAN / {base.upper()} epochs to target: mean "
                     f"{statistics.fmean(ratios[base]) if ratios[base] else math.nan:.3f} over "
                     f"{len(ratios[base])} (task, seed) pairs with the full-budget rule; "
                     f"{statistics.fmean(b) if b else math.nan:.3f} over the {len(b)} pairs "
                     "where both reached the target.")
    lines.append("")
    if dead_by:
        lines += ["Dead trials (final val accuracy within 5 points of chance) over all these "
                  "held-out experiments: " + ", ".join(f"{n} {dead_by[n]}/{trials_by[n]}"
                                                        for n in dead_by) + ".", ""]
    vs = {t: v for t, v in per_task.items() if math.isfinite(v["trial_mean_vs_pbt"])}
    goal = {"epochs_vs_asha": statistics.fmean(ratios["asha"]) if ratios["asha"] else math.nan,
            "epochs_vs_pbt": statistics.fmean(ratios["pbt"]) if ratios["pbt"] else math.nan,
            "delta": statistics.fmean(deltas) if deltas else math.nan, "per_task": per_task,
            "dead_by": dead_by, "trials_by": trials_by, "extra": extra,
            "dead_trials_qan": dead_by.get("qan", 0) if "qan" in dead_by else None,
            "trial_mean_vs_pbt": (min(v["trial_mean_vs_pbt"] for v in vs.values()) if vs
                                  else math.nan)}
    return "\n".join(lines) + "\n", goal


def _ett(r: dict) -> float:
    return float(r["epochs_to_target"]) if r["epochs_to_target"] is not None else float(
        r["budget"])


def plot_lr_paths(rows: list[dict], tasks: list[str], controllers: list[str], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(len(controllers), len(tasks), squeeze=False,
                             figsize=(5.5 * len(tasks), 3.8 * len(controllers)))
    for i, c in enumerate(controllers):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            starts, _, _ = start_lrs(task)
            for k, lr in enumerate(starts):
                color = f"C{k}"
                for r in rows:
                    if r["task"] == task and r["lr0"] == lr and r["method"] == c:
                        ep = [x["step"] for x in r["recs"]][1:]
                        ax.plot(ep, [x["lr"] for x in r["recs"]][1:], color=color, lw=0.9,
                                alpha=0.7)
                        saved = [x for x in r["recs"][1:] if x.get("rescued")]
                        if saved:  # the guard's rescues: rollback and LR cut at this step
                            ax.scatter([x["step"] for x in saved], [x["lr"] for x in saved],
                                       color=color, marker="x", s=25, zorder=3)
                cos = next((r for r in rows if r["task"] == task and r["lr0"] == lr
                            and r["method"] == "cosine"), None)
                if cos is not None:
                    ax.plot([x["step"] for x in cos["recs"]][1:],
                            [x["lr"] for x in cos["recs"]][1:], color=color, ls="--", lw=1.2)
                ax.plot([], [], color=color, label=f"start {lr:g}")
            ax.plot([], [], color="grey", ls="--", label="cosine (same start)")
            ax.scatter([], [], color="grey", marker="x", label="rescue")
            ax.set_yscale("log")
            ax.set_xlabel("epoch (control step)")
            ax.set_ylabel("LR")
            seen = "" if task in HELD_OUT else " (seen)"
            ax.set_title(f"{c} on {task}{seen}", fontsize=10)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def provenance(path: str) -> str:
    spec = load(path).spec
    prov = spec.provenance
    sel = prov.get("selection", {})
    return (f"`{path}`: command `{prov.get('command', '?')}`, commit {prov.get('commit', '?')}, "
            f"{prov.get('episodes', '?')} episodes, selection {sel}, observation "
            f"{'weights + signals' if spec.observation.with_weights else 'signals only'} "
            f"({spec.obs_size} features), actions {spec.action.labels} on a "
            f"{spec.action.schedule} schedule")


def report(args, tasks: list[str], controllers: list[str], log) -> Path:
    from qan_ray.records import write_table

    out = Path(args.results)
    rows = collect_eval(args, tasks, controllers)
    tune_rows = [r for task in tasks if task in HELD_OUT for r in collect_tune(args, task)]
    text_a, goal_a = eval_tables(rows, tasks, controllers)
    text_b, goal_b = tune_tables(tune_rows, [t for t in tasks if t in HELD_OUT])
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    write_table(Path(f"{stem}_eval.parquet"), [
        {**{k: v for k, v in r.items() if k != "recs"}, "rescues": int(r.get("rescues", 0)),
         "dead": is_dead(r["final_val_accuracy"])} for r in rows])
    write_table(Path(f"{stem}_curves.parquet"), [
        {"task": r["task"], "method": r["method"], "lr0": r["lr0"], "seed": r["seed"], **x,
         "rescued": bool(x.get("rescued")), "rescues": int(x.get("rescues") or 0)}
        for r in rows for x in r["recs"]])
    if tune_rows:
        write_table(Path(f"{stem}_tune.parquet"), tune_rows)
    fig = plot_lr_paths(rows, tasks, controllers, Path(f"{stem}_lr_paths.png"))
    md = render(args, tasks, controllers, text_a, goal_a, text_b, goal_b, fig)
    out.write_text(md)
    log(f"wrote {out}, {stem}_eval.parquet, {stem}_curves.parquet, {stem}_tune.parquet, {fig}")
    return out


def collect_eval(args, tasks: list[str], controllers: list[str]) -> list[dict]:
    """Part (a)'s rows of this run's settings, from the cache (nothing is computed)."""
    from qan_ray.evaluate import baseline_config, eval_seeds

    cache = Cache(Path(args.work) / "eval_cache.jsonl")
    ctrls = {c: load(p) for c, p in zip(controllers, args.paths)}
    rows = []
    for task in tasks:
        starts, grid, _ = start_lrs(task)
        ref = next(iter(ctrls.values()))
        for seed in eval_seeds(args.seeds):
            for c, ctrl in ctrls.items():
                for lr in starts:
                    cfg = method_config(args, c, ctrl, task, lr)
                    hit = cache.get(cache.key(cfg_key(cfg), c, args.ids[c], seed))
                    if hit is not None:
                        rows.append({**hit, "task": task})
            for b in BASELINES:
                for lr in (sorted({*starts, *grid}) if b == "fixed" else starts):
                    cfg = baseline_config(task_config(ref, task, lr, args.epochs))
                    pop = b in POPULATION_BASELINES and args.population_baselines
                    hit = cache.get(baseline_key(cache, cfg, b, seed, pop))
                    if hit is not None:
                        rows.append({**hit, "task": task})
        rows += lr_free_rows(cache, args, ref, task, eval_seeds(args.seeds), None, compute=False)
    return [{k: v for k, v in r.items() if k != "key"} for r in rows]


def render(args, tasks, controllers, text_a, goal_a, text_b, goal_b, fig) -> str:
    held = [t for t in tasks if t in HELD_OUT]
    a_met = goal_a["met_val"] and goal_a["met_test"] and bool(goal_a["per"])
    asha, pbt, delta = goal_b["epochs_vs_asha"], goal_b["epochs_vs_pbt"], goal_b["delta"]
    per_task_ok = all(v["delta_pts"] >= 0 for v in goal_b["per_task"].values())
    epochs_ok = asha <= 0.5 and pbt <= 0.5  # False when nan
    b_met = epochs_ok and per_task_ok and bool(goal_b["per_task"])
    lines = [
        "# Transfer of the generalist controller to held-out task families",
        "",
        f"Generated by `python benchmarks/transfer.py {' '.join(sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC"
        f"{', QUICK smoke settings: not a result' if args.quick else ''}).",
        "",
        "Controllers:",
        *[f"- {c}: " + ("the same controller as qan with its rescue guard off (cfg.guard=False)"
                       if c == NOGUARD else f"{provenance(p)}, rescue guard on")
          for c, p in zip(controllers, args.paths)],
        "",
        f"Held-out tasks: {', '.join(held)} (their presets: model, data, optimizer, batch size, "
        "epochs; families `cnn2d` and `mnist1d-mlp` were held out of meta-training). Nothing was "
        "tuned on them: the controller's control problem comes from its spec, one decision per "
        "epoch as in meta-training, baselines as the library defines them.",
        "",
        "## (a) Controller vs baselines from the same start LRs (`qan evaluate`-style)",
        "",
        "Every method runs through the same `TargetTrainingEnv` (same trainer, seeds "
        "1,000,000+i, same init and batch order per seed); the controller is greedy. Baselines: "
        "fixed, cosine (to 0 over the run), plateau (ReduceLROnPlateau on val loss, factor 0.5, "
        "patience 2 epochs), hypergradient (SGD-HD once per epoch), each from the same start, "
        f"all unguarded. `qan` runs with the rescue guard, `{NOGUARD}` is the same controller "
        "without it. A dead run ends within 5 points of chance (`constants.is_dead`); a rescue "
        "is a rollback to the last good state with the LR x rescue_factor.",
        "",
        text_a,
        f"**Goal (a)** (final accuracy >= best baseline from the same start, every start, "
        f"held-out tasks, primary controller): **{'MET' if a_met else 'NOT MET'}** "
        f"(val: {'met' if goal_a['met_val'] else 'not met'}, test: "
        f"{'met' if goal_a['met_test'] else 'not met'}). Mean regret vs the best fixed LR in "
        f"hindsight: {statistics.fmean(goal_a['regret']) if goal_a['regret'] else math.nan:+.2f}"
        " val points.",
        "",
        "### Rescue guard on vs off (the same controller)",
        "",
        ablation_table(goal_a, controllers, NOGUARD, verdict=False),
        "",
        "### New vs old controller (action sets), both guarded",
        "",
        ablation_table(goal_a, controllers, OLD, verdict=False),
        "",
        "### Weight statistics vs signals only",
        "",
        ablation_table(goal_a, controllers),
        "",
        f"LR paths: ![LR paths]({Path(fig).name}) (solid: the controller, one line per seed, x: "
        "a rescue; dashed: cosine from the same start).",
        "",
        "## (b) Tune comparison (`qan compare`-style)",
        "",
        text_b or "(not run)\n",
        f"QAN below is `qan@controller` with the rescue guard (the controller sets every "
        f"trial's LR, FIFO otherwise); `{NOGUARD}` is the same scheduler with task_config "
        "{\"guard\": false}. Mean final val acc (all trials) = each trial's last reported val "
        "accuracy (NaN as chance), mean over the trials, then over seeds; dead trials end within "
        "5 points of chance. Epoch ratios "
        "are per (task, seed), QAN's epochs to target over the baseline's, then the "
        "mean. Final accuracy = test accuracy of the best finished trial, mean over seeds; "
        "best baseline per task by that measure.",
        "",
        *[f"- {t}: best baseline {v['best_baseline']}, QAN - best = {v['delta_pts']:+.2f} pts, "
          f"QAN+ASHA - best = {v['qan_plus_asha_delta_pts']:+.2f} pts"
          for t, v in goal_b["per_task"].items()],
        "",
        f"**Goal (b)** (QAN <= 0.5x the epochs of ASHA and of PBT to the target, at equal or "
        f"better final accuracy on every held-out task): **{'MET' if b_met else 'NOT MET'}** "
        f"(epochs: {'met' if epochs_ok else 'not met'}, {asha:.3f}x ASHA and {pbt:.3f}x PBT; "
        f"final accuracy equal or better on every task: {'yes' if per_task_ok else 'no'}).",
        "",
        *goal_lines(goal_a, goal_b),
        "## Shortfalls and next ideas",
        "",
        args.analysis or "(see the report of the run)",
        "",
        f"epochs_vs_asha: {asha:.3f}",
        f"epochs_vs_pbt: {pbt:.3f}",
        f"final_acc_delta_vs_best_baseline: {delta:+.2f}",
        *last_lines(goal_a, goal_b),
    ]
    return "\n".join(lines) + "\n"


def goal_lines(goal_a: dict, goal_b: dict) -> list[str]:
    """The section on the goals of "No dead trials" (targets, not gates)."""
    dead_by, trials_by = goal_b.get("dead_by", {}), goal_b.get("trials_by", {})
    won, cells = sum(goal_a["cells"]), len(goal_a["cells"])
    lines = ["## Goals: no dead trials (QAN recognises a dying run and rescues it)", "",
             "Targets, not gates; the numbers as measured.", ""]
    if "qan" in dead_by:
        lines.append(f"- Dead QAN trials (guard on) over all held-out Tune experiments: "
                     f"**{dead_by['qan']}/{trials_by['qan']}** (target 0); others: "
                     + ", ".join(f"{n} {dead_by[n]}/{trials_by[n]}" for n in dead_by
                                 if n != "qan") + ".")
    else:
        lines.append("- Dead QAN trials: part (b) has no finished QAN experiments in this run.")
    for t, v in goal_b.get("per_task", {}).items():
        tm = v["trial_mean"]
        lines.append(f"- {t}: QAN's per-trial mean final val accuracy "
                     f"{tm.get('qan', math.nan):.4f}; QAN - PBT = "
                     f"**{v['trial_mean_vs_pbt']:+.4f}**, QAN - FIFO = "
                     f"**{v['trial_mean_vs_fifo']:+.4f}** (target >= 0 for both)"
                     + (f"; {NOGUARD} {tm[NOGUARD]:.4f}" if NOGUARD in tm else "") + ".")
    lines += [f"- Part (a) cells won (held-out task x start LR where the guarded controller's "
              f"mean final val accuracy >= the best baseline's from the same start): "
              f"**{won}/{cells}** (target: all); dead runs per cell in the tables above.",
              ""]
    return lines + lr_free_lines(goal_a, goal_b)


def lr_free_lines(goal_a: dict, goal_b: dict) -> list[str]:
    """The section on what users pick instead: LR-free optimizers in (a), TPE and LR-free rows
    in (b) (targets, not gates)."""
    per = [p for p in goal_a["per"] if p["task"] in HELD_OUT and p.get("best_lr_free")
           and p["controller"] == goal_a["per"][0]["controller"]] if goal_a["per"] else []
    lines = ["## Goals: QAN against what users pick instead (LR-free optimizers, TPE)", ""]
    if per:
        won = sum(p["qan_val"] >= p["best_lr_free_val"] for p in per)
        lines += ["(a) QAN (guard on) against the best LR-free optimizer per held-out cell "
                  "(they ignore the start LR: the same runs serve every start):", "",
                  "| task | start LR | QAN | best LR-free | QAN - best LR-free (pts) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['task']} | {p['lr0']:g} | {p['qan_val']:.4f} | {p['best_lr_free']} "
                  f"{p['best_lr_free_val']:.4f} | "
                  f"{(p['qan_val'] - p['best_lr_free_val']) * 100:+.2f} |"
                  for p in per]
        lines += ["", f"- Cells where QAN >= the best LR-free optimizer: **{won}/{len(per)}** "
                  f"(target: all); smallest margin {lr_free_margin(goal_a):+.3f}.", ""]
    else:
        lines += ["- (a): no LR-free runs in this cache.", ""]
    for task, v in goal_b.get("extra", {}).items():
        lines.append(f"- (b) {task}, best val acc at the same epoch budget (mean over the seeds "
                     "both finished): " + "; ".join(
                         f"QAN {q:.4f} vs {n} {x:.4f} ({k} seeds, QAN "
                         f"{'>=' if q >= x else '<'})" for n, (q, x, k) in v["others"].items())
                     + " (target: QAN >= each).")
    return lines + [""]


def last_lines(goal_a: dict, goal_b: dict) -> list[str]:
    """The lines the result file ends with."""
    dead = goal_b.get("dead_trials_qan")
    vs_pbt = goal_b.get("trial_mean_vs_pbt", math.nan)
    return [f"dead_trials_qan: {'n/a' if dead is None else dead}",
            f"trial_mean_vs_pbt: {vs_pbt:+.3f}",
            f"cells_won: {sum(goal_a['cells'])}/{len(goal_a['cells'])}",
            f"qan_vs_best_lr_free: {lr_free_margin(goal_a):+.3f}"]


def lr_free_margin(goal_a: dict) -> float:
    """Over the held-out (task, start) cells of (a): the smallest difference between the
    primary controller's mean final val accuracy and the best LR-free optimizer's (accuracy
    units; negative where QAN loses)."""
    return min(goal_a["lr_free"]) if goal_a.get("lr_free") else math.nan


# --- CLI -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--controller", required=True, help="controller folder, or builtin")
    p.add_argument("--signals-controller", default=None,
                   help="a signals-only controller (--no-weight-features) for the ablation")
    p.add_argument("--old-controller", default=None,
                   help=f"another controller (e.g. policies/builtin at its old version, actions "
                        f"x0.5..x2) to run guarded in part (a) as {OLD!r}")
    p.add_argument("--tasks", default=",".join(HELD_OUT))
    p.add_argument("--in-distribution", action="store_true",
                   help=f"also evaluate {IN_DISTRIBUTION} (seen in training), part (a) only")
    p.add_argument("--seeds", type=int, default=5, help="evaluation seeds, part (a)")
    p.add_argument("--tune-seeds", type=int, default=5)
    p.add_argument("--run-tune-seeds", default=None,
                   help="part (b): run only these seeds (e.g. 3,4; parallel processes on one "
                        "task must take disjoint seeds); the report reads seeds 0..tune-seeds-1")
    p.add_argument("--tune-samples", type=int, default=8)
    p.add_argument("--schedulers", default=None,
                   help="part (b): a comma-separated subset of " + ",".join(
                       (*TUNE_SCHEDULERS, NOGUARD_TUNE, *OPTIONAL_SCHEDULERS)) + " (default: "
                   f"all that the scheduler factory accepts; {NOGUARD_TUNE}: qan with the guard "
                   "off, recorded apart); the report uses the seeds on which all of them "
                   "finished")
    p.add_argument("--tune-epochs", default=None,
                   help="epochs per trial: N, or TASK=N,... (default: the preset's epochs)")
    p.add_argument("--epochs", default=None,
                   help="part (a) episode epochs: N, or TASK=N,... (default: the preset's)")
    p.add_argument("--population-baselines", action="store_true",
                   help="fixed and cosine as populations (qan_ray.control.run_schedules, "
                        "`qan evaluate --population-baselines`): much cheaper; equal to float "
                        "tolerance where training is stable")
    p.add_argument("--part", choices=("all", "eval", "tune", "report"), default="all")
    p.add_argument("--work", default=None, help="cache folder (default runs/transfer)")
    p.add_argument("--results", default=None,
                   help="result file (default benchmarks/results/transfer.md)")
    p.add_argument("--analysis-file", default=None,
                   help="Markdown with the shortfall analysis, put into the result file")
    p.add_argument("--quick", action="store_true",
                   help="smoke settings: 1 seed, 2 epochs, Tune 2 trials x 2 epochs x 1 seed, "
                        "outputs under runs/transfer_quick")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a shared CPU: more threads only contend
    if args.quick:
        args.seeds, args.tune_seeds, args.tune_samples = 1, 1, 2
        args.tune_epochs = args.tune_epochs or "2"
        args.epochs = args.epochs or "2"
        args.work = args.work or str(ROOT / "runs" / "transfer_quick")
        args.results = args.results or str(Path(args.work) / "transfer.md")
    args.work = args.work or str(ROOT / "runs" / "transfer")
    args.results = args.results or str(RESULTS / "transfer.md")
    args.analysis = (Path(args.analysis_file).read_text().strip() if args.analysis_file
                     else "")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    eval_tasks = tasks + ([IN_DISTRIBUTION] if args.in_distribution else [])
    methods = {"qan": args.controller, NOGUARD: args.controller}
    if args.old_controller:
        methods[OLD] = args.old_controller
    if args.signals_controller:
        methods[SIGNALS] = args.signals_controller
    names, args.paths = list(methods), list(methods.values())
    args.guards = {n: n != NOGUARD for n in names}  # baselines: unguarded (baseline_config)
    args.ids = {n: controller_id(pth) for n, pth in zip(names, args.paths)}
    Path(args.work).mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.part in ("all", "eval"):
        run_eval(args, {n: load(pth) for n, pth in zip(names, args.paths)}, eval_tasks, log)
    if args.part in ("all", "tune"):
        run_tune(args, tasks, log)
    if args.part in ("all", "report"):
        report(args, eval_tasks, names, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
