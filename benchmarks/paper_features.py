"""Question: do the two features that set QAN (Fu et al. 2016) apart pay off here? Measured on the
embedded digits and MNIST-1D tasks, NOT on MNIST: no MNIST on the machine these results come
from, and no network.

1. Meta-momentum on vs off (the paper: about 20 meta-training episodes until the controller
   matches the best fixed LR on MNIST). Two arms of `MetaTrainer` (RLlib DQN over 2 trainer
   actors, the digits-mlp preset: batch 32, one LR decision every 10 mini-batches, actions x
   0.5/0.9/1/1.1/2, reward log_loss, gamma 0.95), identical but for meta-momentum during
   meta-training: off (mm_coef 0) or the coefficient of the paper presets (paper-mnist-lr:
   mm_coef 0.005, mm_active_fraction 0.5, W* = the final weights of a reference run). Every
   --eval-every episodes the greedy controller (epsilon 0, meta-momentum off, so both arms are
   judged on the same footing) runs on --eval-seeds held-out evaluation seeds; its mean final val
   accuracy is compared with the best fixed LR of a grid (task LR x 0.2, 0.5, 1, 2, 4) on the same
   seeds and trainer. Reported: the first checkpoint (episodes) at which it reaches the best fixed
   LR's final accuracy, per meta seed, or "not within E episodes", and the accuracy curve.
2. Mini-batch class selection (minibatch mode, qan_ray.class_sampling: bounded class-share actions
   that never starve a class). A controller meta-trained by `qan train` (RLlib DQN,
   `--mb-controller`, default the one in results/paper_features_controller, whose spec.json records
   its command and task mix) runs greedily on balanced digits-mlp, the class-imbalanced
   digits-mlp-imbalanced, mnist1d-mlp-imbalanced (mnist1d-mlp is a held-out family: not in the
   controller's training mix) and mnist1d-cnn-imbalanced, and the label-noise digits-mlp-noisy, at
   each preset's fixed LR, one decision per epoch, against uniform batches (the plain permutation),
   class-balanced (inverse frequency), loss-proportional sampling and uniformly random class
   actions, all through the same training loop (TargetTrainingEnv, the guard on). Reported:
   balanced val accuracy of the final weights (and balanced test accuracy), mean +- sd over
   --mb-eval-seeds evaluation seeds, differences paired by seed; the file ends with
   `minibatch_vs_uniform` (balanced digits-mlp) and `minibatch_vs_uniform_imbalanced` (the smaller
   over the imbalanced variants), controller minus uniform in accuracy units. Running only
   `--features 2` keeps feature 1's block of the results file.

Feature 1: mean +- sd over meta seeds (each value the mean over the evaluation seeds), except
the baselines (mean +- sd over the evaluation seeds). Meta seed m trains with RLlib seed m and
task seed 1000 m; evaluation seeds are 1,000,000 + i (never used in meta-training).

    python benchmarks/paper_features.py [--meta-seeds 3] [--episodes 30] [--eval-every 10]
                                        [--eval-seeds 3] [--mb-controller DIR] [--mb-eval-seeds 5]
    python benchmarks/paper_features.py --features 2   # feature 2 alone (no Ray, minutes)
    python benchmarks/paper_features.py --quick   # smoke test: 1 seed, 4 episodes, into runs/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results"
MM = dict(mm_coef=0.005, mm_active_fraction=0.5, mm_reference="final")  # paper-mnist-lr


def _ms(xs, digits: int = 4) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} +- {sd:.{digits}f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def greedy_point(ctrl, cfg, seeds: int, target: float, per_epoch: int, mm_coef: float = 0.0):
    """The greedy controller on the evaluation seeds: mean final val / test accuracy, mean epochs
    to `target` over the runs reaching it, how many reached it."""
    from qan_ray.evaluate import batches_to_target, run_controller_seeds

    rs = run_controller_seeds(ctrl, cfg, seeds, mm_coef=mm_coef).by_method["qan"]
    ep = [batches_to_target(r["recs"], target) for r in rs]
    ep = [b / per_epoch for b in ep if b is not None]
    return {"val_acc": statistics.mean(r["final_val_accuracy"] for r in rs),
            "test_acc": statistics.mean(r["test_accuracy"] for r in rs),
            "epochs_to_target": _mean(ep), "reached": len(ep), "runs": len(rs),
            "final_lr": statistics.mean(r["recs"][-1]["lr"] for r in rs),
            "actions": "".join(str(a) for a in (r["action"] for r in rs[0]["recs"][1:]))}


def meta_train(cfg, ms: int, episodes: int, eval_every: int, evaluate, log) -> list[dict]:
    """One meta seed of RLlib DQN meta-training (one exploration schedule over all `episodes`),
    `evaluate(controller)` after every chunk of `eval_every` episodes."""
    from policies.qnet import load_controller
    from qan_ray.meta import MetaConfig, MetaTrainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        meta = MetaConfig(episodes=episodes, num_actors=2, cpus_per_actor=0.9, seed=ms)
        mt = MetaTrainer(cfg.replace(seed=1000 * ms), meta, Path(tmp) / "run",
                         log=lambda *_: None)
        t = time.time()
        try:
            while mt.progress["episodes"] < episodes:
                mt.train(until=min(episodes, mt.progress["episodes"] + eval_every))
                train_s = time.time() - t
                ctrl = load_controller(mt.out)
                point = evaluate(ctrl)
                rows.append({"meta_seed": ms, "episodes": mt.progress["episodes"],
                             "meta_train_s": train_s, **point})
                log(rows[-1])
                t = time.time()
        finally:
            mt.stop()
    return rows


MB_TASKS = ("digits-mlp", "digits-mlp-imbalanced", "mnist1d-mlp-imbalanced",
            "mnist1d-cnn-imbalanced", "digits-mlp-noisy")
IMBALANCED = ("digits-mlp-imbalanced", "mnist1d-mlp-imbalanced", "mnist1d-cnn-imbalanced")
ROOT = Path(__file__).resolve().parents[1]
MB_CONTROLLER = RESULTS / "paper_features_controller"


def mb_config(task: str):
    """A benchmark task in minibatch mode at its preset LR, one decision per epoch (the cadence
    the controller was meta-trained at), reward val_loss."""
    from qan_ray.config import from_dict
    from qan_ray.distribution import batches_per_epoch

    cfg = from_dict(task=task, device="cpu", action_mode="minibatch", reward="val_loss")
    return cfg.replace(control_interval=batches_per_epoch(cfg))


def mb_run(cfg, policy, seed: int, env_cache: dict) -> dict:
    """One training run of `cfg` driven by `policy(env, obs, info) -> action`, through the env
    (so the guard and every episode rule apply as in meta-training); balanced val/test accuracy
    of the final weights."""
    from qan_ray.env import TargetTrainingEnv, rollout

    key = json.dumps(cfg.to_dict(), sort_keys=True, default=list)
    env = env_cache.setdefault(key, TargetTrainingEnv(cfg))
    recs = rollout(env, lambda obs, info: policy(env, obs, info), seed)
    val, test = env.trainer.evaluate_classes("val"), env.trainer.evaluate_classes("test")
    return {"balanced_val": val["balanced_accuracy"], "val_acc": val["accuracy"],
            "balanced_test": test["balanced_accuracy"], "rescues": recs[-1]["rescues"],
            "actions": "".join(str(r["action"]) for r in recs[1:]),
            "shares": ([round(x, 3) for x in env.trainer.class_shares]
                       if cfg.action_mode == "minibatch" else None)}


def _shown(path) -> str:
    """A controller folder as the results name it (relative to the repository when inside)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def mb_arms(ctrl, also: dict | None = None) -> dict:
    """Arm name -> (config transform, policy). Baselines set the sampler's shares exactly and
    keep; uniform batches are the plain permutation of lr mode at the same fixed LR."""
    import numpy as np

    from qan_ray.class_sampling import KEEP, baseline_shares

    def baseline(kind):
        def act(env, obs, info):
            tr = env.trainer
            tr.set_class_shares(baseline_shares(kind, tr.population.data_shares,
                                                info.get("class_val_loss")))
            return KEEP
        return act

    def uniform(env, obs, info):
        return env.actions.keep_action

    def random_actions(env, obs, info):
        if info["step"] == 0:  # seeded by the run's seed
            env.bench_rng = np.random.default_rng(env.trainer.seed)
        return int(env.bench_rng.integers(env.action_space.n))

    return {"uniform batches": (lambda c: c.replace(action_mode="lr"), uniform),
            "sampler at the data's shares (keep)": (None, lambda env, obs, info: KEEP),
            "class-balanced (inverse frequency)": (None, baseline("balanced")),
            "loss-proportional": (None, baseline("loss-proportional")),
            "random class actions": (None, random_actions),
            "minibatch controller": (None, lambda env, obs, info: ctrl.act(obs)),
            **{name: (None, lambda env, obs, info, c=c: c.act(obs))
               for name, c in (also or {}).items()}}


def minibatch_selection(args, log) -> dict:
    """Feature 2: the meta-trained minibatch controller against uniform batches and the classic
    sampling baselines, on balanced digits-mlp and the class-imbalanced and label-noise
    variants; balanced val accuracy of the final weights over the evaluation seeds."""
    from policies.qnet import load_controller
    from qan_ray.contract import ControllerSpec
    from qan_ray.evaluate import eval_seeds

    ctrl = load_controller(args.mb_controller)
    spec = ControllerSpec.load(Path(args.mb_controller) / "spec.json")
    seeds = eval_seeds(args.mb_eval_seeds)
    also = {f"controller {_shown(p)}": load_controller(p)
            for p in (args.mb_also.split(",") if args.mb_also else [])}
    arms = mb_arms(ctrl, also)
    res: dict[str, dict[str, list[dict]]] = {}
    cache: dict = {}
    raw = []
    for task in MB_TASKS:
        cfg = mb_config(task)
        res[task] = {}
        for arm, (transform, policy) in arms.items():
            c = transform(cfg) if transform else cfg
            res[task][arm] = []
            for s in seeds:
                r = mb_run(c, policy, s, cache)
                res[task][arm].append(r)
                raw.append({"feature": "minibatch", "task": task, "arm": arm, "eval_seed": s,
                            **r})
            log(f"[minibatch] {task} {arm}: balanced val acc "
                f"{_ms([r['balanced_val'] for r in res[task][arm]])}")
    md = [f"Controller: `{_shown(args.mb_controller)}` (meta-trained by `qan train`, RLlib DQN: "
          f"{spec.provenance.get('command', '?')}; {spec.provenance.get('episodes', '?')} "
          f"episodes, tasks {spec.task.get('tasks')}). The benchmark tasks' own seeds are "
          f"evaluation seeds {seeds}, never used in meta-training. "
          "mnist1d-mlp (the held-out family) enters only here."
          + (f" Rows `controller ...`: other meta seeds of the same command ({', '.join(also)}),"
             " shown for the spread over meta-training; the verdict and the summary lines are "
             "the first controller's." if also else ""), "",
          "Every arm is the same training loop (TargetTrainingEnv: the guard and the episode "
          "rules as in meta-training) at the preset's fixed LR, one decision per epoch. "
          "Uniform batches: the plain permutation (lr mode, keep); the sampler at the data's "
          "shares (always keep) is the same distribution drawn class-stratified, what a "
          "controller that never moves starts from. The baselines set the class "
          "shares exactly (no floor): class-balanced = equal shares (inverse frequency), "
          "loss-proportional = the classes' last val losses over their sum. Random class "
          "actions: the bounded actions drawn uniformly (what an untrained controller can do). "
          "Accuracies are balanced (the mean of the per-class accuracies) on the final weights; "
          "differences are paired by evaluation seed.", ""]
    summary = {}
    for task in MB_TASKS:
        uni = [r["balanced_val"] for r in res[task]["uniform batches"]]
        bal = [r["balanced_val"] for r in res[task]["class-balanced (inverse frequency)"]]
        md += [f"### {task}", "", "| arm | balanced val acc | balanced test acc | vs uniform | "
               "vs class-balanced | rescues |", "|---|---|---|---|---|---|"]
        for arm in arms:
            rs = res[task][arm]
            v = [r["balanced_val"] for r in rs]
            md.append(f"| {arm} | {_ms(v)} | {_ms([r['balanced_test'] for r in rs])} | "
                      f"{_ms([a - b for a, b in zip(v, uni)], 4)} | "
                      f"{_ms([a - b for a, b in zip(v, bal)], 4)} | "
                      f"{sum(r['rescues'] for r in rs)} |")
        ctrl_rs = res[task]["minibatch controller"]
        md += ["", "Controller actions per evaluation seed (0 keep, 1 toward uniform, 2 toward "
               "balanced, 3 toward loss-proportional, 4 toward the hardest class) and final "
               "class shares:", ""]
        md += [f"- {s}: `{r['actions']}` {r['shares']}" for s, r in zip(seeds, ctrl_rs)]
        md.append("")
        diff = statistics.mean(r["balanced_val"] for r in ctrl_rs) - statistics.mean(uni)
        summary[task] = {"vs_uniform": diff, "vs_balanced": statistics.mean(
            r["balanced_val"] for r in ctrl_rs) - statistics.mean(bal)}
    out = {"minibatch_vs_uniform": summary["digits-mlp"]["vs_uniform"],
           "minibatch_vs_uniform_imbalanced": min(summary[t]["vs_uniform"] for t in IMBALANCED)}
    verdict = [
        "### Verdict", "",
        f"- Balanced digits-mlp: controller - uniform = {out['minibatch_vs_uniform']:+.4f} "
        f"(goal: not below -0.005): "
        f"**{'met' if out['minibatch_vs_uniform'] >= -0.005 else 'not met'}**.",
        *[f"- {t}: controller - uniform = {summary[t]['vs_uniform']:+.4f}, controller - "
          f"class-balanced = {summary[t]['vs_balanced']:+.4f} (goal: both > 0): **"
          f"{'met' if min(summary[t].values()) > 0 else 'not met'}**." for t in IMBALANCED],
        f"- digits-mlp-noisy: controller - uniform = "
        f"{summary['digits-mlp-noisy']['vs_uniform']:+.4f} (no goal; loss-proportional "
        "sampling is the classic failure there).", ""]
    return {"md": verdict + md, "raw": raw, "summary": out}


def uniform_grid(cfg, seeds: int, per_epoch: int, log):
    """fixed@LR grid (+ step, cosine from the best) on uniform batches, same trainer and seeds."""
    from qan_ray.evaluate import run_baselines

    runs, best_lr = run_baselines(cfg, seeds, adaptive=(), log=log)
    out = {}
    for method, rs in runs.by_method.items():
        out[method] = {"val": [r["final_val_accuracy"] for r in rs],
                       "test": [r["test_accuracy"] for r in rs], "recs": [r["recs"] for r in rs]}
    return out, best_lr


def main() -> None:  # noqa: C901, PLR0915 - one benchmark, read top to bottom
    import ray
    import torch

    from qan_ray.config import from_dict
    from qan_ray.env import TargetTrainingEnv
    from qan_ray.evaluate import eval_seeds
    from qan_ray.records import write_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meta-seeds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=30, help="feature 1: episodes per arm/seed")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--mb-controller", default=str(MB_CONTROLLER),
                   help="feature 2: the minibatch controller (a `qan train` controller folder)")
    p.add_argument("--mb-eval-seeds", type=int, default=5, help="feature 2: evaluation seeds")
    p.add_argument("--mb-also", default="",
                   help="feature 2: more controller folders (other meta seeds), shown as rows")
    p.add_argument("--eval-seeds", type=int, default=3)
    p.add_argument("--features", default="1,2", help="which features to run (1, 2 or 1,2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 meta seed, 4 episodes, 1 evaluation seed; writes "
                        "runs/paper_features.* instead of the results")
    args = p.parse_args()
    if args.quick:
        args.meta_seeds, args.episodes, args.eval_every, args.mb_eval_seeds = 1, 4, 2, 1
        args.eval_seeds = 1
    stem = "paper_features"
    results = Path(__file__).resolve().parents[1] / "runs" if args.quick else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.time()

    def log(msg) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    features = {int(f) for f in args.features.split(",")}
    raw: list[dict] = []
    md: list[str] = []
    if 1 in features:  # feature 2 needs no Ray: a trained controller, runs in this process
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="qan")

    # ---------------- feature 1: meta-momentum on vs off ----------------------------------------
    base = from_dict(task="digits-mlp", device="cpu")
    per_epoch = TargetTrainingEnv(base).trainer.batches_per_epoch
    curves: dict[str, list[dict]] = {}
    if 1 in features:
        grid, best_lr = uniform_grid(base, args.eval_seeds, per_epoch, log)
        best_fixed = f"fixed@{best_lr:g}"
        best_acc = statistics.mean(grid[best_fixed]["val"])
        log(f"feature 1: best fixed LR {best_fixed}, final val acc {best_acc:.4f}")
        for method, g in grid.items():
            raw.append({"feature": "meta_momentum", "arm": method, "kind": "baseline",
                        "val_acc": statistics.mean(g["val"]), "val_acc_sd": statistics.stdev(
                            g["val"]) if len(g["val"]) > 1 else 0.0,
                        "test_acc": statistics.mean(g["test"])})
        arms = {"mm off": base, f"mm on (coef {MM['mm_coef']:g})": base.replace(**MM)}
        for arm, cfg in arms.items():
            curves[arm] = []
            for ms in range(args.meta_seeds):
                def ev(ctrl):
                    return greedy_point(ctrl, base, args.eval_seeds, best_acc, per_epoch)

                rows = meta_train(cfg, ms, args.episodes, args.eval_every, ev,
                                  lambda r, arm=arm: log(f"[{arm}] seed {r['meta_seed']} ep "
                                                         f"{r['episodes']}: greedy val acc "
                                                         f"{r['val_acc']:.4f} (best fixed "
                                                         f"{best_acc:.4f}), meta-train "
                                                         f"{r['meta_train_s']:.0f}s"))
                curves[arm] += rows
                for r in rows:
                    raw.append({"feature": "meta_momentum", "arm": arm, "kind": "greedy", **r})
        # the paper's per-seed statistic
        lines = []
        for arm in arms:
            matched = []
            for ms in range(args.meta_seeds):
                hit = [r["episodes"] for r in curves[arm]
                       if r["meta_seed"] == ms and r["val_acc"] >= best_acc]
                matched.append(min(hit) if hit else None)
            finals = [r for r in curves[arm] if r["episodes"] == args.episodes]
            best_seen = [max(r["val_acc"] for r in curves[arm] if r["meta_seed"] == ms)
                         for ms in range(args.meta_seeds)]
            lines.append((arm, matched, finals, best_seen))
        for arm, matched, _, _ in lines:
            for ms, m in enumerate(matched):
                raw.append({"feature": "meta_momentum", "arm": arm, "kind": "matched_at",
                            "meta_seed": ms, "episodes": m})
        final_mm = lines
        md += [
            "### 1. Meta-momentum on vs off: episodes until the greedy controller matches the "
            "best fixed LR", "",
            f"Best fixed LR of the grid: {best_fixed}, final val acc {best_acc:.4f} +- "
            f"{statistics.stdev(grid[best_fixed]['val']) if args.eval_seeds > 1 else 0:.4f} over "
            f"{args.eval_seeds} evaluation seeds. Grid (mean final val acc): " + ", ".join(
                f"{m} {statistics.mean(g['val']):.4f}" for m, g in sorted(
                    grid.items(), key=lambda kv: -statistics.mean(kv[1]["val"]))) + ".", "",
            "| arm | matches best fixed LR after (episodes, per meta seed) | seeds matched | "
            f"greedy val acc after {args.episodes} ep | test acc | best checkpoint val acc | "
            "meta-train s per chunk |", "|---|---|---|---|---|---|---|"]
        for arm, matched, finals, best_seen in final_mm:
            shown = ", ".join(str(m) if m is not None else f"not within {args.episodes}"
                              for m in matched)
            secs = [r["meta_train_s"] for r in curves[arm]]
            md.append(f"| {arm} | {shown} | {sum(m is not None for m in matched)}/"
                      f"{len(matched)} | {_ms([r['val_acc'] for r in finals])} | "
                      f"{_ms([r['test_acc'] for r in finals])} | {_ms(best_seen)} | "
                      f"{_ms(secs, 0)} |")
        md += ["", "Greedy val accuracy per checkpoint (mean +- sd over meta seeds):", "",
               "| episodes | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for e in sorted({r["episodes"] for rs in curves.values() for r in rs}):
            md.append(f"| {e} | " + " | ".join(
                _ms([r["val_acc"] for r in curves[a] if r["episodes"] == e]) for a in arms)
                + " |")
        md += ["", "Per meta seed and checkpoint (greedy val acc; actions of evaluation seed 0, "
               "0..4 = x0.5, x0.9, x1, x1.1, x2):", "",
               "| arm | meta seed | episodes | val acc | final LR | actions |",
               "|---|---|---|---|---|---|"]
        for arm in arms:
            for r in curves[arm]:
                md.append(f"| {arm} | {r['meta_seed']} | {r['episodes']} | {r['val_acc']:.4f} | "
                          f"{r['final_lr']:.3g} | {r['actions']} |")
        md.append("")
        f1 = {"best_acc": best_acc, "best_fixed": best_fixed, "lines": final_mm}
    else:
        f1 = None

    # ---------------- feature 2: mini-batch class selection ------------------------------------
    f2 = None
    if 2 in features:
        f2 = minibatch_selection(args, log)
        raw += f2["raw"]
    if ray.is_initialized():
        ray.shutdown()
    wall = time.time() - t0

    # ---------------- verdicts, files ----------------------------------------------------------
    machine = (f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
               f"jobs, torch {torch.__version__}, Ray {ray.__version__}; {wall:.0f}s wall in all")
    command = f"- command: `python benchmarks/paper_features.py {' '.join(sys.argv[1:])}`"
    blocks = {}
    if f1:
        head = ["## Feature 1: meta-momentum (digits-mlp, lr mode)", "", command, machine,
                f"- meta seeds 0..{args.meta_seeds - 1} (RLlib seed m, task seed 1000 m), "
                f"evaluation seeds {eval_seeds(args.eval_seeds)}; {args.episodes} episodes per "
                f"arm and seed, greedy evaluation every {args.eval_every}", "", "### Verdict", ""]
        if f1:
            off, on = f1["lines"][0], f1["lines"][1]
            matched_on = [m for m in on[1] if m is not None]
            met = bool(matched_on) and len(matched_on) == len(on[1]) and max(matched_on) <= 20
            faster = _mean([m if m is not None else math.inf for m in on[1]]) < _mean(
                [m if m is not None else math.inf for m in off[1]])
            head.append(
                f"- Feature 1 (with meta-momentum the greedy controller matches the best fixed "
                f"LR within ~20 episodes, the paper's MNIST claim): "
                f"**{'met' if met else 'not met'}**. "
                f"Episodes to match per meta seed: mm on {on[1]}, mm off {off[1]} (None = not "
                f"within {args.episodes}). Meta-momentum {'is' if faster else 'is not'} faster "
                "than no meta-momentum on this measure.")
        head.append("")
        _plot(curves, f1, results / f"{stem}.png")
        blocks["1"] = ("\n".join(head) + "\n" + "\n".join(md)
                       + f"\n![greedy accuracy per checkpoint]({stem}.png)\n")
    if f2:
        blocks["2"] = "\n".join(["## Feature 2: mini-batch class selection", "", command, machine,
                                 "", *f2["md"]]) + "\n"
    out = results / f"{stem}.md"
    text = write_blocks(out, blocks, f2["summary"] if f2 else None)
    keys = list(dict.fromkeys(k for r in raw for k in r))  # every column, not the first row's
    write_table(results / f"{stem}{'' if 1 in features else '_minibatch'}.parquet",
                [{k: (json.dumps(r[k]) if isinstance(r.get(k), (list, dict)) else r.get(k))
                  for k in keys} for r in raw])
    print(text)


TITLE = "# QAN's two distinctive features (benchmarks/paper_features.py)"
SUMMARY_KEYS = ("minibatch_vs_uniform", "minibatch_vs_uniform_imbalanced")


def write_blocks(out: Path, blocks: dict[str, str], summary: dict[str, float] | None) -> str:
    """The results file: a block per feature (a feature not run keeps its block from the file,
    and each block keeps the hand-written analysis after its `<!-- analysis -->` marker), then
    the summary lines, last."""
    old = out.read_text() if out.exists() else ""
    parts = re.split(r"<!-- (feature \d|summary) -->\n?", old)
    found = {parts[i].split()[-1]: parts[i + 1] for i in range(1, len(parts) - 1, 2)
             if parts[i].startswith("feature")}
    marker = "<!-- analysis -->"
    text = [TITLE, ""]
    for key in ("1", "2"):
        body = blocks.get(key)
        if body is None:
            body = found.get(key, "")
        elif marker in found.get(key, ""):
            body += "\n" + marker + found[key].split(marker, 1)[1]
        if body:
            text += [f"<!-- feature {key} -->", body.rstrip("\n"), ""]
    if summary is None:  # keep the last measured numbers
        summary = {k: float(v) for k, v in re.findall(r"^(minibatch_vs_uniform\w*): ([-+.\d]+)$",
                                                       old, re.M)}
    if summary:
        text += ["<!-- summary -->"] + [f"{k}: {summary[k]:+.3f}" for k in SUMMARY_KEYS
                                        if k in summary]
    out.write_text("\n".join(text) + "\n")
    return out.read_text()


def _plot(curves, f1, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for names, ref, title in (([a for a in curves if a.startswith("mm")], f1["best_acc"],
                               "1. meta-momentum (lr mode, batch 32)"),):
        for name in names:
            rows = curves.get(name, [])
            eps = sorted({r["episodes"] for r in rows})
            means = [statistics.mean(r["val_acc"] for r in rows if r["episodes"] == e)
                     for e in eps]
            sds = [statistics.stdev(v) if len(v := [r["val_acc"] for r in rows
                                                    if r["episodes"] == e]) > 1 else 0.0
                   for e in eps]
            ax.errorbar(eps, means, yerr=sds, marker="o", capsize=3, label=name)
        if ref:
            ax.axhline(ref, color="k", ls="--", lw=1,
                       label="best fixed LR" if names and names[0].startswith("mm")
                       else "uniform batches")
        ax.set_xlabel("meta-training episodes")
        ax.set_ylabel("greedy final val acc")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
