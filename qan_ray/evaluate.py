"""`qan evaluate`: a controller, greedy (epsilon 0), against baselines on the same trainer.

Every method runs through the same training loop (`PopulationTrainer`: the controller's episodes
on a `TargetTrainingEnv`, whose `TargetTrainer` is its K = 1 view; the baselines x seeds as
populations by default), with the same features and validation at the same control points; only
who sets the learning rate differs:
- qan: the controller's greedy action at each control point;
- fixed@LR for every LR of a grid, then the best of them ("best fixed" by mean final val accuracy);
- step (x0.1 at 50% and 75%) and cosine, both from the best fixed LR (the strongest start we know);
- what a Tune user runs without meta-training, each from the task's LR (the controller's start):
  cosine with a linear warm-up over the first 5% (warmup_cosine), torch's ReduceLROnPlateau on
  the validation loss at each control point (factor 0.5, patience 2 control points: plateau), and
  hypergradient descent (Baydin et al. 2018, SGD-HD's rule once per control point on the
  interval's mean gradient: hypergradient; qan_ray.control.HypergradientBaseline);
- what a user runs instead of tuning an LR (qan_ray.lrfree, K = 1 through the same trainer):
  prodigy@1 and dadapt@1 (Prodigy, D-Adaptation SGD/Adam at LR 1 with cosine over the run) and
  schedulefree@LR (Schedule-Free SGD/AdamW with its warm-up, at the best LR of a small grid in
  hindsight, which the table says).
In minibatch mode the baselines draw ordinary uniform batches.

Evaluation seeds (`constants.eval_seed(i)` = 1,000,000 + i) never occur in meta-training (whose
seeds are `constants.episode_seed`: 10,000,000 x (meta seed + 1) + i).
Every method starts from the task's LR (`lr_init_range` is a training-time option).
Meta-momentum is off at evaluation unless --ablate-meta-momentum adds a "qan+mm" run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from qan_ray import lrfree
from qan_ray.config import QANConfig
from qan_ray.constants import EVAL_SEED_BASE, eval_seed, is_dead  # noqa: F401 - re-exported
from qan_ray.control import make_baseline
from qan_ray.distribution import TASK_FIELDS, batches_per_epoch, load_config
from qan_ray.env import TargetTrainingEnv, rollout
from qan_ray.records import fault_point, write_table
from qan_ray.signals import keyboard_interrupts
from qan_ray.summaries import mean_sd

DEFAULT_GRID_FACTORS = (0.2, 0.5, 1.0, 2.0, 4.0)


def run_controller(env: TargetTrainingEnv, controller, seed: int) -> list[dict[str, Any]]:
    """One greedy (epsilon 0) episode of `controller` on `env`."""
    return rollout(env, lambda obs, info: controller.act(obs), seed)


ADAPTIVE_BASELINES = ("warmup_cosine", "plateau", "hypergradient")
"""Run from the task LR by run_baselines (after fixed@grid, step and cosine)."""


def run_schedule(env: TargetTrainingEnv, name: str, lr: float, seed: int) -> list[dict]:
    """A baseline (qan_ray.control.BASELINES) from LR `lr` on the same env: the trainer's LR is
    set at each control point, then the keep action."""
    baseline = make_baseline(name, lr)
    keep = env.actions.keep_action

    def act(obs, info):
        env.trainer.set_lr(baseline.next_lr(env.trainer, info))
        return keep

    return rollout(env, act, seed)


def batches_to_target(recs: list[dict], target: float) -> int | None:
    for r in recs:
        if r.get("val_accuracy") is not None and r["val_accuracy"] >= target:
            return int(r["batches"])
    return None


class Runs:
    """Episodes of several methods on one task: method -> per-seed results, plus step curves."""

    def __init__(self) -> None:
        self.by_method: dict[str, list[dict]] = {}
        self.curves: list[dict] = []

    def add(self, method: str, seed: int, recs: list[dict], env, seconds: float) -> None:
        _, test_acc = env.trainer.evaluate("test")
        self.by_method.setdefault(method, []).append({
            "method": method, "seed": seed, "final_val_accuracy": recs[-1]["val_accuracy"],
            "test_accuracy": test_acc, "wall_s": seconds,
            "diverged": any(r.get("diverged") for r in recs), "recs": recs})
        self._curves(method, seed, recs)

    def _curves(self, method: str, seed: int, recs: list[dict]) -> None:
        for r in recs:
            self.curves.append({"method": method, "seed": seed, "batches": r["batches"],
                                "val_accuracy": r["val_accuracy"], "val_loss": r["val_loss"],
                                "train_loss": r["train_loss"], "lr": r["lr"],
                                "action": r["action"], "rescued": bool(r.get("rescued")),
                                "composition": r.get("composition")})

    def add_records(self, method: str, seed: int, recs: list[dict], test_accuracy: float,
                    seconds: float) -> None:
        """`add` for an episode that ran outside an env (a population member)."""
        self.by_method.setdefault(method, []).append({
            "method": method, "seed": seed, "final_val_accuracy": recs[-1]["val_accuracy"],
            "test_accuracy": float(test_accuracy), "wall_s": seconds,
            "diverged": any(r.get("diverged") for r in recs), "recs": recs})
        self._curves(method, seed, recs)

    def take(self, methods: list[str]) -> Runs:
        """Move `methods` (with their curves) out of these runs into a new Runs."""
        out = Runs()
        for m in methods:
            out.by_method[m] = self.by_method.pop(m)
        keep = set(methods)
        out.curves = [c for c in self.curves if c["method"] in keep]
        self.curves = [c for c in self.curves if c["method"] not in keep]
        return out

    def mean_final(self, method: str) -> float:
        return mean_sd([r["final_val_accuracy"] for r in self.by_method[method]])[0]

    def merged(self, other: Runs) -> Runs:
        out = Runs()
        out.by_method = {**self.by_method, **other.by_method}
        out.curves = self.curves + other.curves
        return out


def _timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def eval_seeds(n: int) -> list[int]:
    return [eval_seed(i) for i in range(n)]


def baseline_config(cfg: QANConfig) -> QANConfig:
    """Baselines: uniform batches (lr mode), a keep action available, meta-momentum off, the
    LR they set held until the next control point (no controller schedule underneath), and no
    rescue guard (the guard is part of QAN; a baseline is what a user runs without it)."""
    base = cfg.replace(action_mode="lr", mm_coef=0.0, lr_schedule="constant", guard=False)
    if 1.0 not in base.lr_factors:
        base = base.replace(lr_factors=(*base.lr_factors, 1.0))
    return base


def run_baselines(cfg: QANConfig, seeds: int = 3, lr_grid: tuple[float, ...] = (),
                  log=print, adaptive: tuple[str, ...] = ADAPTIVE_BASELINES,
                  population: bool = True,
                  lr_free: tuple[str, ...] = lrfree.METHODS) -> tuple[Runs, float]:
    """fixed@LR over the grid, then step and cosine from the best fixed LR, then the `adaptive`
    baselines from the task LR cfg.lr, then the `lr_free` optimizers (run_lr_free). Returns the
    runs and the best fixed LR.

    With `population` (the default, for a task a population can batch: no BatchNorm model, no
    task distribution), the fixed grid and the adaptive baselines x every seed train as one
    population, and step and cosine x seeds (they need the best fixed LR) as a second one
    (control.run_schedules: the same records as the env's episodes, to float tolerance); a
    run's wall s is then its population's time / members. Both paths run the same training
    loop (PopulationTrainer; the env's TargetTrainer is its K = 1 view): the batched one differs
    only in float rounding (vmap's batched matmuls), which can grow into different final
    accuracies where training is chaotic (e.g. fixed@0.2 with momentum 0.9 on digits)."""
    bcfg = baseline_config(cfg)
    grid = tuple(sorted(lr_grid or {round(cfg.lr * f, 6) for f in DEFAULT_GRID_FACTORS}))
    grid = tuple(lr for lr in grid if cfg.lr_min <= lr <= cfg.lr_max)
    if not grid:
        raise ValueError(f"the LR grid is empty inside [lr_min, lr_max] = [{cfg.lr_min}, "
                         f"{cfg.lr_max}]. Pass --lr-grid with values in that range.")
    batched = _population_schedules(bcfg, log) if population else None
    env = None if batched is not None else TargetTrainingEnv(bcfg)
    runs = Runs()
    seeds_ = eval_seeds(seeds)

    def episodes(specs: list[tuple[str, str, float]], into: Runs) -> None:
        """(method, schedule, lr) x every seed, as one population or one env episode each."""
        if batched is not None:
            members = [(name, lr, seed) for _, name, lr in specs for seed in seeds_]
            (records, test_acc), sec = _timed(batched, members)
            for j, (method, _, _) in enumerate(specs):
                for i, seed in enumerate(seeds_):
                    m = j * len(seeds_) + i
                    into.add_records(method, seed, records[m], test_acc[m], sec / len(members))
            return
        for method, name, lr in specs:
            for seed in seeds_:
                recs, sec = _timed(run_schedule, env, name, lr, seed)
                into.add(method, seed, recs, env, sec)

    early_adaptive = list(adaptive) if batched is not None else []
    episodes([(f"fixed@{lr:g}", "fixed", lr) for lr in grid]
             + [(f"{n}@{cfg.lr:g}", n, cfg.lr) for n in early_adaptive], runs)
    early = runs.take([f"{n}@{cfg.lr:g}" for n in early_adaptive])
    for lr in grid:
        log(f"fixed@{lr:g}: final val acc {runs.mean_final(f'fixed@{lr:g}'):.4f}")
    best_lr = max(grid, key=lambda lr: runs.mean_final(f"fixed@{lr:g}"))
    episodes([(f"{name}@{best_lr:g}", name, best_lr) for name in ("step", "cosine")], runs)
    for name in ("step", "cosine"):
        log(f"{name}@{best_lr:g}: final val acc {runs.mean_final(f'{name}@{best_lr:g}'):.4f}")
    for name in adaptive:
        method = f"{name}@{cfg.lr:g}"
        if method in early.by_method:
            runs = runs.merged(early)
        else:
            if env is None:
                env = TargetTrainingEnv(bcfg)
            for seed in seeds_:
                recs, sec = _timed(run_schedule, env, name, cfg.lr, seed)
                runs.add(method, seed, recs, env, sec)
        log(f"{method}: final val acc {runs.mean_final(method):.4f}")
    if lr_free:
        runs = runs.merged(run_lr_free(cfg, seeds, lr_free, log))
    return runs, best_lr


def lr_free_config(cfg: QANConfig, method: str, lr: float) -> QANConfig:
    """The baseline config (baseline_config) of LR-free `method` (qan_ray.lrfree.METHODS) at
    LR `lr`: the optimizer of the task's family (Schedule-Free AdamW / D-Adapt Adam for Adam
    tasks, the SGD versions otherwise)."""
    return baseline_config(cfg).replace(optimizer=lrfree.optimizer_for(method, cfg.optimizer),
                                        lr=lr)


def run_lr_free(cfg: QANConfig, seeds: int = 3, methods: tuple[str, ...] = lrfree.METHODS,
                log=print) -> Runs:
    """The LR-free optimizers through the same trainer (one env episode per seed, K = 1), on
    the evaluation seeds: rows prodigy@1 and dadapt@1 (LR 1, cosine over the run), and
    schedulefree@LR, the best LR of lrfree.schedulefree_grid by mean final val accuracy (the
    other grid LRs are logged). Methods whose package is missing are skipped with a log line."""
    runs = Runs()
    unknown = [m for m in methods if m not in lrfree.METHODS]
    if unknown:
        raise ValueError(f"LR-free method(s) {unknown} must be among {lrfree.METHODS}. Try "
                         "--lr-free prodigy,schedulefree,dadapt (or none).")
    absent = lrfree.missing(methods)
    if absent:
        log(f"LR-free baselines skipped: {', '.join(absent)} not installed; {lrfree.INSTALL}")
        methods = tuple(m for m in methods if lrfree.PACKAGES[m] not in absent)
    for method in methods:
        grid = [lr for lr in lrfree.lr_grid(method, cfg.optimizer)
                if cfg.lr_min <= lr <= cfg.lr_max]
        trial = Runs()
        for lr in grid:
            env = TargetTrainingEnv(lr_free_config(cfg, method, lr))
            for seed in eval_seeds(seeds):
                recs, sec = _timed(run_schedule, env, lrfree.RECIPES[method], lr, seed)
                trial.add(f"{method}@{lr:g}", seed, recs, env, sec)
        best = max(trial.by_method, key=trial.mean_final)
        for name in trial.by_method:
            log(f"{name}: final val acc {trial.mean_final(name):.4f}"
                + (" (best of its LR grid)" if len(grid) > 1 and name == best else ""))
        runs = runs.merged(trial.take([best]))
    return runs


def _population_schedules(bcfg: QANConfig, log=print):
    """run_schedules on `bcfg`'s task (one data load for every population), or None (with the
    reason logged) where PopulationTrainer cannot batch the task."""
    from qan_ray.control import run_schedules
    from qan_ray.population import PopulationTrainer

    if bcfg.tasks:
        log("baselines: a task distribution runs episode by episode (no population)")
        return None
    try:
        probe = PopulationTrainer(bcfg, k=2)  # K > 1: what a population refuses
    except ValueError as err:
        log(f"baselines: episode by episode ({str(err).split(';')[0]})")
        return None
    data, device = probe.data, probe.device
    del probe
    return lambda members: run_schedules(bcfg, members, data=data, device=device)


def run_controller_seeds(controller, cfg: QANConfig, seeds: int = 3, method: str = "qan",
                         mm_coef: float = 0.0) -> Runs:
    """Greedy controller episodes on the evaluation seeds (meta-momentum off unless given)."""
    env = TargetTrainingEnv(cfg.replace(mm_coef=mm_coef))
    controller.spec.check_fits(env.observer.spec, f"task {cfg.task!r}")
    runs = Runs()
    for seed in eval_seeds(seeds):
        recs, sec = _timed(run_controller, env, controller, seed)
        runs.add(method, seed, recs, env, sec)
        fault_point("evaluate-episode")
    return runs


def summarise(runs: Runs, target_accuracy: float | None = None) -> dict[str, Any]:
    """Per-method table rows; the target defaults to the best baseline's mean final accuracy."""
    baselines = [m for m in runs.by_method if not m.startswith("qan")]
    best_baseline = max(baselines, key=runs.mean_final)
    fixed = [m for m in baselines if m.startswith("fixed@")]
    best_fixed = max(fixed, key=runs.mean_final) if fixed else None
    target = target_accuracy if target_accuracy is not None else runs.mean_final(best_baseline)
    summary = []
    for method, rs in runs.by_method.items():
        val_m, val_s = mean_sd([r["final_val_accuracy"] for r in rs])
        test_m, test_s = mean_sd([r["test_accuracy"] for r in rs])
        reached = [b for b in (batches_to_target(r["recs"], target) for r in rs) if b is not None]
        summary.append({
            "method": method, "val_acc_mean": val_m, "val_acc_std": val_s,
            "test_acc_mean": test_m, "test_acc_std": test_s,
            "batches_to_target_mean": statistics.mean(reached) if reached else None,
            "reached_target": len(reached), "runs": len(rs),
            "wall_s_mean": statistics.mean(r["wall_s"] for r in rs),
            "final_lr_mean": statistics.mean(r["recs"][-1]["lr"] for r in rs),
            "diverged": sum(r["diverged"] for r in rs),
            "dead": sum(is_dead(r["final_val_accuracy"]) for r in rs),
            "rescues": sum(int(r["recs"][-1].get("rescues", 0)) for r in rs),
            "best_fixed": method == best_fixed, "best_baseline": method == best_baseline,
        })
    return {"summary": summary, "curves": runs.curves, "target": target,
            "best_baseline": best_baseline, "best_fixed": best_fixed}


def evaluate(controller, cfg: QANConfig, seeds: int = 3, lr_grid: tuple[float, ...] = (),
             target_accuracy: float | None = None, ablate_mm: float = 0.0,
             log=print, population_baselines: bool = True,
             lr_free: tuple[str, ...] = lrfree.METHODS) -> dict[str, Any]:
    """Controller (and optionally controller + meta-momentum) vs all baselines, same seeds.
    Every method starts every episode from cfg.lr (a controller trained from random initial LRs,
    `lr_init_range`, is evaluated from the same start as the baselines)."""
    cfg = cfg.replace(lr_init_range=None)
    runs = run_controller_seeds(controller, cfg, seeds)
    log(f"qan: final val acc {runs.mean_final('qan'):.4f}")
    if ablate_mm > 0:
        runs = runs.merged(run_controller_seeds(controller, cfg, seeds, "qan+mm", ablate_mm))
    baselines, best_lr = run_baselines(cfg, seeds, lr_grid, log,
                                       population=population_baselines, lr_free=lr_free)
    result = summarise(runs.merged(baselines), target_accuracy)
    tr = TargetTrainingEnv(baseline_config(cfg)).trainer
    result.update(best_lr=best_lr, seeds=eval_seeds(seeds),
                  batches_per_epoch=tr.batches_per_epoch, total_batches=tr.total_batches)
    return result


def markdown_table(result: dict[str, Any], cfg: QANConfig) -> str:
    lines = [
        f"task `{cfg.task}`, action mode `{cfg.action_mode}`, {len(result['seeds'])} seeds "
        f"({result['seeds'][0]}..), {result['total_batches']} mini-batches per run, "
        f"target val accuracy {result['target']:.4f} (best baseline: {result['best_baseline']})",
        "",
        "| method | val acc (mean +- std) | test acc (mean +- std) | batches to target "
        "(reached) | dead runs | rescues | final LR | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["summary"], key=lambda r: (not r["method"].startswith("qan"),
                                                       -r["val_acc_mean"])):
        btt = ("-" if r["batches_to_target_mean"] is None
               else f"{r['batches_to_target_mean']:.0f}")
        mark = " (best)" if r["best_baseline"] else ""
        # a diverged baseline reads 0.0000 (or chance); the cell says it diverged
        div = (f" (diverged {r['diverged']}/{r['runs']})" if r.get("diverged") else "")
        lines.append(f"| {r['method']}{mark} | {r['val_acc_mean']:.4f} +- {r['val_acc_std']:.4f}"
                     f"{div}"
                     f" | {r['test_acc_mean']:.4f} +- {r['test_acc_std']:.4f} | {btt} "
                     f"({r['reached_target']}/{r['runs']}) | {r['dead']}/{r['runs']} | "
                     f"{r['rescues']} | {r['final_lr_mean']:.3g} | {r['wall_s_mean']:.2f} |")
    if any(r["method"].startswith("schedulefree@") for r in result["summary"]):
        grid = ", ".join(f"{lr:g}" for lr in lrfree.schedulefree_grid(cfg.optimizer))
        lines += ["", f"schedulefree@LR: Schedule-Free at the best LR of its grid ({grid}) by "
                  "mean final val accuracy, picked in hindsight on these seeds; prodigy@1 and "
                  "dadapt@1 run at LR 1 with cosine over the run (qan_ray.lrfree)."]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], cfg: QANConfig, out: Path,
                  training_steps: Path | None = None) -> dict[str, Path]:
    from qan_ray import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.md").write_text("# qan evaluate\n\n" + markdown_table(result, cfg))
    files = {"table": out / "evaluation.md",
             "summary": write_table(out / "evaluation.parquet", result["summary"]),
             "curves": write_table(out / "curves.parquet", [
                 {k: v for k, v in r.items() if k != "composition"} for r in result["curves"]])}
    files["accuracy"] = plots.plot_accuracy_curves(
        result["curves"], out / "accuracy_vs_epoch.png", result["target"],
        result["batches_per_epoch"])
    files["lr"] = plots.plot_lr(result["curves"], out / "lr_over_time.png")
    if cfg.action_mode == "minibatch":
        files["class_shares"] = plots.plot_class_shares(result["curves"], out / "class_shares.png")
    if training_steps is not None and training_steps.is_dir():
        from qan_ray.records import read_parts

        files["learning_curve"] = plots.plot_learning_curve(
            read_parts(training_steps), out / "learning_curve.png")
    return files


def evaluation_config(trained: dict[str, Any], flags: dict[str, Any]) -> QANConfig:
    """The task config of an evaluation: the controller's training config overridden by the
    flags given. A controller meta-trained on a task distribution, evaluated on one task
    (`--task`), keeps only its control problem (actions, reward, observation, bounds): the
    task's own fields (data, model, optimizer, batch, epochs, LR) come from `--task` and the
    other flags, and it decides once per epoch as in meta-training unless --control-interval
    is given."""
    if not trained:
        return load_config(flags)
    if trained.get("tasks") and (flags.get("task") or flags.get("tasks") is not None):
        control = {k: v for k, v in trained.items() if k not in TASK_FIELDS}
        cfg = load_config({**control, **flags})
        if "control_interval" not in flags and not cfg.tasks:
            cfg = cfg.replace(control_interval=batches_per_epoch(cfg))
        return cfg
    return load_config({**trained, **flags})


def run_evaluate(args: argparse.Namespace) -> int:
    from qan_ray.records import writable_dir

    if args.seeds < 1:
        raise ValueError(f"`--seeds` is {args.seeds}; it must be >= 1. Try --seeds 3.")
    out = Path(args.out)
    created = not out.exists()
    writable_dir(out, "--out")  # before any compute: never lose the results at the end
    try:
        with keyboard_interrupts():
            return _evaluate_into(args, out)
    except KeyboardInterrupt:
        kept = "" if created else f" (what {out} held before is untouched)"
        print(f"qan evaluate: interrupted before the results were written; nothing was saved"
              f"{kept}. Run the same command again.", file=sys.stderr)
        return 130
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed or interrupted evaluation leaves no empty folder behind


def _evaluate_into(args: argparse.Namespace, out: Path) -> int:
    from policies.qnet import load_controller
    from qan_ray.config import _FIELDS

    controller = load_controller(args.controller)
    flags = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    cfg = evaluation_config(controller.spec.task, flags)
    grid = tuple(float(x) for x in args.lr_grid.split(",")) if args.lr_grid else ()
    print(f"evaluating controller {args.controller} on {cfg.task} ({args.seeds} seeds) -> {out}")
    methods = getattr(args, "lr_free", ",".join(lrfree.METHODS))
    lr_free = tuple(m.strip() for m in methods.split(",") if m.strip() and m.strip() != "none")
    result = evaluate(controller, cfg, args.seeds, grid, ablate_mm=args.ablate_meta_momentum,
                      population_baselines=args.population_baselines, lr_free=lr_free)
    steps = None
    ctrl_path = Path(args.controller)
    for candidate in (ctrl_path / "steps", ctrl_path.parent / "steps"):
        if candidate.is_dir():
            steps = candidate
    files = write_outputs(result, cfg, out, steps)
    print(markdown_table(result, cfg))
    print("figures: " + ", ".join(str(p) for k, p in files.items() if str(p).endswith(".png")))
    return 0
