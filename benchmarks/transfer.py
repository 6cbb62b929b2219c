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
the same start LRs one decade apart inside the task's optimizer family range
(qan_ray.distribution.LR_RANGES); a fixed-LR grid at half-decade spacing over that whole range
gives the best fixed LR in hindsight (the regret reference). Evaluation seeds 1,000,000 + i (never
used in meta-training). With --signals-controller, a signals-only controller (`--no-weight-
features`) runs too, for the weight-statistics ablation.

(b) `qan compare`-style (qan_ray.compare.compare, protocol qan_ray/protocol.py): qan@CONTROLLER,
qan+asha@CONTROLLER vs asha, pbt, fifo (and asha+cosine when the scheduler factory accepts it),
8 trials x the preset's epochs (--tune-epochs TASK=N to cut a long preset for compute), LR
log-uniform over the optimizer family range, >= 5 seeds.

Writes benchmarks/results/transfer.md, transfer_eval.parquet (one row per method, start, seed),
transfer_curves.parquet (every control step), transfer_tune.parquet (one row per scheduler,
seed, task) and transfer_lr_paths.png. Intermediate results are cached under --work, so an
interrupted run continues where it stopped.

Usage:
  python benchmarks/transfer.py --quick --controller builtin            (a smoke run, minutes)
  python benchmarks/transfer.py --controller runs/generalist/run/controller \\
      --tune-epochs mnist1d-mlp=20 [--in-distribution] \\
      [--signals-controller runs/generalist_signals/run/controller]
  --part eval | tune | report runs one part (e.g. eval and tune in separate processes, one
  Tune process per task with --tasks), then `--part report` with the same flags writes the
  result file from the cached episodes and recorded experiments.
"""

from __future__ import annotations

import argparse
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
TUNE_SCHEDULERS = ("qan", "qan+asha", "asha", "pbt", "fifo")
OPTIONAL_SCHEDULERS = ("asha+cosine",)
RESULTS = ROOT / "benchmarks" / "results"


# --- configs -------------------------------------------------------------------------------------
def load(path: str):
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


def start_lrs(task: str) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(3 start LRs one decade apart inside the family range, the fixed-LR grid at half-decade
    spacing over the whole range, the family)."""
    family = optimizer_family(from_dict(task=task))
    low, high = LR_RANGES[family]
    decades = math.log10(high / low)
    mid = math.sqrt(low * high)
    starts = tuple(_round(mid * 10.0 ** k) for k in (-1, 0, 1))
    grid = tuple(_round(low * 10.0 ** (i / 2)) for i in range(int(round(2 * decades)) + 1))
    return starts, grid, family


def _round(x: float) -> float:
    """x on the half-decade grid 1, 3, 10, 30, ... x 10^k (one significant digit)."""
    return float(f"{10.0 ** (round(2 * math.log10(x)) / 2):.1g}")


# --- (a) evaluation through the env ------------------------------------------------------------
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

    key = cache.key(env_cfg.to_dict(), method, act_id, seed)
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
           "recs": [{k: v for k, v in x.items() if k in ("step", "batches", "lr", "val_accuracy",
                                                         "val_loss", "train_loss", "action")}
                    for x in recs]}
    cache.put(key, row)
    log(f"    {method:<16} lr0 {lr:<7g} seed {seed}: val {row['final_val_accuracy']:.4f} "
        f"test {row['test_accuracy']:.4f}{' DIVERGED' if row['diverged'] else ''} "
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
                cfg = task_config(ctrl, task, lr, args.epochs)
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
    return rows


POPULATION_BASELINES = ("fixed", "cosine")  # schedules: qan_ray.control.run_schedules
_KEEP = ("step", "batches", "lr", "val_accuracy", "val_loss", "train_loss", "action")


def baseline_key(cache: Cache, cfg: QANConfig, base: str, seed: int, population: bool) -> str:
    return cache.key(cfg.to_dict(), base, base + ("@population" if population else ""), seed)


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
                   "population": True,
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
    """The schedulers of part (b) (`only`: a comma-separated subset of their base names)."""
    from qan_ray.protocol import make_scheduler

    names = list(TUNE_SCHEDULERS)
    for extra in OPTIONAL_SCHEDULERS:
        try:
            make_scheduler(extra, proto)
        except ValueError:
            continue
        names.append(extra)
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"--schedulers names {unknown}; choose from {names}.")
        names = [n for n in names if n in wanted]
    return [f"{n}@{controller}" if n.startswith("qan") else n for n in names]


def tune_protocol(task: str, args):
    from qan_ray.protocol import Protocol

    _, grid, _ = start_lrs(task)
    epochs = tune_epochs(args.tune_epochs, task)
    return Protocol(task_config={"task": task, "device": "cpu"}, samples=args.tune_samples,
                    epochs=epochs, lr_low=grid[0], lr_high=grid[-1], max_concurrent=2,
                    cpus_per_trial=1.0, policy=args.controller)


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
            proto = tune_protocol(task, args)
            names = tune_names(args.controller, proto, args.schedulers)
            out = Path(args.work) / f"tune_{task}"
            log(f"(b) {task}: {names}, seeds {args.tune_seeds}, {proto.samples} trials x "
                f"{proto.epochs} epochs (budget {proto.budget}), LR in "
                f"[{proto.lr_low:g}, {proto.lr_high:g}] -> {out}")
            seeds = ([int(x) for x in args.run_tune_seeds.split(",")] if args.run_tune_seeds
                     else list(range(args.tune_seeds)))
            compare(names, proto, seeds, out, log=log)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def collect_tune(args, task: str) -> list[dict]:
    """Part (b)'s summaries of `task` from the experiments recorded under --work: every seed
    whose experiments all finished (targets per seed, as `qan compare` sets them)."""
    from qan_ray.compare import finished_run
    from qan_ray.protocol import align_action_mode
    from qan_ray.summaries import add_targets

    proto = tune_protocol(task, args)
    names = tune_names(args.controller, proto, args.schedulers)
    align_action_mode(names, proto)  # what compare() does to the protocol before it runs
    out = Path(args.work) / f"tune_{task}"
    runs = []
    for seed in range(args.tune_seeds):
        done = [finished_run(out, name, proto, seed) for name in names]
        if all(d is not None for d in done):
            runs += done
    return [{**s, "task": task, "budget": proto.budget, "scheduler": _short(s["scheduler"])}
            for s in add_targets(runs, 1.0)]


def _short(name: str) -> str:
    return name.partition("@")[0]


# --- report --------------------------------------------------------------------------------------
def _ms(values, fmt=".4f", scale=1.0) -> str:
    m, s = mean_sd([v * scale for v in values])
    return "n/a" if math.isnan(m) else f"{m:{fmt}} ± {s:{fmt}}"


def eval_tables(rows: list[dict], tasks: list[str], controllers: list[str]) -> tuple[str, dict]:
    """Markdown for part (a) and the goal numbers."""
    lines, goal = [], {"met_val": True, "met_test": True, "regret": [], "delta": {}, "per": []}
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
                  f"Starts {', '.join(f'{s:g}' for s in starts)} (one decade apart inside the "
                  f"{family} range {LR_RANGES[family]}); {n} seeds; best fixed LR in hindsight "
                  f"(grid {', '.join(f'{g:g}' for g in grid)}): **{best_lr:g}**, final val "
                  f"{best_val:.4f}, test {best_test:.4f}.", "",
                  "| start LR | method | final val acc | test acc | diverged | val regret vs "
                  "best fixed (pts) |", "|---|---|---|---|---|---|"]
        for lr in starts:
            methods = [*controllers, *BASELINES]
            present = [m for m in methods if (m, lr) in by]
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
                mark = " (best baseline)" if m == best_b else ""
                lines.append(f"| {lr:g} | {m}{mark} | {_ms(val)} | "
                             f"{_ms([r['test_accuracy'] for r in rs])} | "
                             f"{sum(r['diverged'] for r in rs)}/{len(rs)} | {regret:+.2f} |")
            for c in controllers:
                if (c, lr) not in by:
                    continue
                cv = mean_sd([r["final_val_accuracy"] for r in by[(c, lr)]])[0]
                ct = mean_sd([r["test_accuracy"] for r in by[(c, lr)]])[0]
                paired = _paired(by[(c, lr)], by[(best_b, lr)], "final_val_accuracy")
                per = {"task": task, "controller": c, "lr0": lr, "qan_val": cv, "qan_test": ct,
                       "best_baseline": best_b, "best_baseline_val": base_val[best_b],
                       "best_baseline_test_method": best_bt,
                       "best_baseline_test": base_test[best_bt],
                       "met_val": cv >= base_val[best_b], "met_test": ct >= base_test[best_bt],
                       "regret_val_pts": (best_val - cv) * 100,
                       "regret_test_pts": (best_test - ct) * 100, "paired_val_pts": paired}
                goal["per"].append(per)
                if c == controllers[0] and task in HELD_OUT:
                    goal["met_val"] &= per["met_val"]
                    goal["met_test"] &= per["met_test"]
                    goal["regret"].append(per["regret_val_pts"])
        lines.append("")
    lines += ["Goal (a), per start: controller's mean final accuracy >= the best baseline's "
              "(fixed, cosine, plateau, hypergradient) from the same start LR. Paired difference "
              "over the same seeds (controller - best baseline, val, points):", "",
              "| task | controller | start LR | best baseline (val) | controller - best (val pts, "
              "paired mean ± sd) | val met | test met | regret vs best fixed (val / test pts) |",
              "|---|---|---|---|---|---|---|---|"]
    for p in goal["per"]:
        m, s = p["paired_val_pts"]
        lines.append(f"| {p['task']}{'' if p['task'] in HELD_OUT else ' (seen)'} | "
                     f"{p['controller']} | {p['lr0']:g} | {p['best_baseline']} "
                     f"{p['best_baseline_val']:.4f} | {m:+.2f} ± {s:.2f} | "
                     f"{'yes' if p['met_val'] else 'no'} | {'yes' if p['met_test'] else 'no'} | "
                     f"{p['regret_val_pts']:+.2f} / {p['regret_test_pts']:+.2f} |")
    return "\n".join(lines) + "\n", goal


def _paired(a: list[dict], b: list[dict], key: str) -> tuple[float, float]:
    bs = {r["seed"]: r[key] for r in b}
    return mean_sd([(r[key] - bs[r["seed"]]) * 100 for r in a if r["seed"] in bs])


def ablation_table(goal: dict, controllers: list[str]) -> str:
    if len(controllers) < 2:
        return ("No signals-only controller was given (--signals-controller), so the "
                "weight-statistics ablation is not in this run.\n")
    a, b = controllers[:2]
    lines = [f"| task | start LR | {a} val | {b} val | {a} - {b} (pts) |", "|---|---|---|---|---|"]
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
                     f"{d:+.2f} |")
    mean = statistics.fmean(diffs) if diffs else math.nan
    median = statistics.median(diffs) if diffs else math.nan
    wins = sum(d > 0 for d in diffs)
    lines += ["", f"Held-out tasks and starts: weights - signals-only = {mean:+.2f} val points on "
              f"average, median {median:+.2f}; the weight statistics are ahead in {wins} of "
              f"{len(diffs)} (task, start) cells. "
              + ("Weights help on this evidence." if mean > 0 and wins > len(diffs) / 2 else
                 "Weights do not pay for themselves on this evidence." if mean <= 0
                 and wins <= len(diffs) / 2 else
                 "Mixed: the mean and the majority of cells disagree (one large cell dominates "
                 "the mean); see the analysis below.")]
    return "\n".join(lines) + "\n"


def tune_tables(rows: list[dict], tasks: list[str]) -> tuple[str, dict]:
    lines, ratios, deltas, flags = [], {"asha": [], "pbt": []}, [], []
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
                  "| scheduler | best val acc | final test acc (best finished trial) | epochs to "
                  "target (reached) | total epochs | wall s |", "|---|---|---|---|---|---|"]
        for n in names:
            rs = [r for r in mine if r["scheduler"] == n]
            ett = [_ett(r) for r in rs]
            reached = sum(r["epochs_to_target"] is not None for r in rs)
            lines.append(f"| {n} | {_ms([r['best_val_accuracy'] for r in rs])} | "
                         f"{_ms([r['test_accuracy_best_finished'] for r in rs])} | "
                         f"{_ms(ett, '.1f')} ({reached}/{len(rs)}) | "
                         f"{_ms([r['total_epochs'] for r in rs], '.1f')} | "
                         f"{_ms([r['wall_s'] for r in rs], '.1f')} |")
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
        bases = {n: v for n, v in final.items() if not n.startswith("qan")}
        best = max(bases, key=bases.get)
        deltas.append((final["qan"] - bases[best]) * 100)
        per_task[task] = {"best_baseline": best, "delta_pts": deltas[-1],
                          "qan_plus_asha_delta_pts": (final.get("qan+asha", math.nan)
                                                      - bases[best]) * 100}
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
    goal = {"epochs_vs_asha": statistics.fmean(ratios["asha"]) if ratios["asha"] else math.nan,
            "epochs_vs_pbt": statistics.fmean(ratios["pbt"]) if ratios["pbt"] else math.nan,
            "delta": statistics.fmean(deltas) if deltas else math.nan, "per_task": per_task}
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
                cos = next((r for r in rows if r["task"] == task and r["lr0"] == lr
                            and r["method"] == "cosine"), None)
                if cos is not None:
                    ax.plot([x["step"] for x in cos["recs"]][1:],
                            [x["lr"] for x in cos["recs"]][1:], color=color, ls="--", lw=1.2)
                ax.plot([], [], color=color, label=f"start {lr:g}")
            ax.plot([], [], color="grey", ls="--", label="cosine (same start)")
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
    write_table(Path(f"{stem}_eval.parquet"), [{k: v for k, v in r.items() if k != "recs"}
                                               for r in rows])
    write_table(Path(f"{stem}_curves.parquet"), [
        {"task": r["task"], "method": r["method"], "lr0": r["lr0"], "seed": r["seed"], **x}
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
                    cfg = task_config(ctrl, task, lr, args.epochs)
                    hit = cache.get(cache.key(cfg.to_dict(), c, args.ids[c], seed))
                    if hit is not None:
                        rows.append({**hit, "task": task})
            for b in BASELINES:
                for lr in (sorted({*starts, *grid}) if b == "fixed" else starts):
                    cfg = baseline_config(task_config(ref, task, lr, args.epochs))
                    pop = b in POPULATION_BASELINES and args.population_baselines
                    hit = cache.get(baseline_key(cache, cfg, b, seed, pop))
                    if hit is not None:
                        rows.append({**hit, "task": task})
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
        *[f"- {c}: {provenance(p)}" for c, p in zip(controllers, args.paths)],
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
        "patience 2 epochs), hypergradient (SGD-HD once per epoch), each from the same start.",
        "",
        text_a,
        f"**Goal (a)** (final accuracy >= best baseline from the same start, every start, "
        f"held-out tasks, primary controller): **{'MET' if a_met else 'NOT MET'}** "
        f"(val: {'met' if goal_a['met_val'] else 'not met'}, test: "
        f"{'met' if goal_a['met_test'] else 'not met'}). Mean regret vs the best fixed LR in "
        f"hindsight: {statistics.fmean(goal_a['regret']) if goal_a['regret'] else math.nan:+.2f}"
        " val points.",
        "",
        "### Weight statistics vs signals only",
        "",
        ablation_table(goal_a, controllers),
        "",
        f"LR paths: ![LR paths]({Path(fig).name}) (solid: the controller, one line per seed; "
        "dashed: cosine from the same start).",
        "",
        "## (b) Tune comparison (`qan compare`-style)",
        "",
        text_b or "(not run)\n",
        "QAN below is `qan@controller` (the controller sets every trial's LR, FIFO otherwise); "
        "ratios are per (task, seed), QAN's epochs to target over the baseline's, then the "
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
        "## Shortfalls and next ideas",
        "",
        args.analysis or "(see the report of the run)",
        "",
        f"epochs_vs_asha: {asha:.3f}",
        f"epochs_vs_pbt: {pbt:.3f}",
        f"final_acc_delta_vs_best_baseline: {delta:+.2f}",
    ]
    return "\n".join(lines) + "\n"


# --- CLI -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--controller", required=True, help="controller folder, or builtin")
    p.add_argument("--signals-controller", default=None,
                   help="a signals-only controller (--no-weight-features) for the ablation")
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
                       TUNE_SCHEDULERS + OPTIONAL_SCHEDULERS) + " (default: all that the "
                   "scheduler factory accepts); the report uses the seeds on which all of them "
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
    names = ["qan"] + (["qan-signals"] if args.signals_controller else [])
    args.paths = [args.controller] + ([args.signals_controller] if args.signals_controller
                                      else [])
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
