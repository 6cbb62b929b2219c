"""Question: do the two features that set QAN (Fu et al. 2016) apart pay off here? Measured on the
embedded digits-mlp task (scikit-learn's 8x8 digits, a 64-unit MLP), NOT on MNIST: no MNIST on
the machine these results come from, and no network.

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
2. Mini-batch class selection vs uniform batches. The paper's minibatch setting: batch 128, one
   decision per mini-batch, the action picks a class that becomes the newest entry of a roulette
   of the last 10 class actions; the newest gets 20 of 128 samples, the other 9 get 12 each
   (focus_share 20/128). LR fixed at the best fixed LR of a uniform-batch grid at batch 128 (same
   grid factors), meta-momentum off in both arms (the class selection alone is compared), reward
   val_loss (the per-step log validation-loss improvement; the default log_loss is measured on
   the training batches the action itself composes, so it would pay for skewing them). Arms,
   all on the same trainer and evaluation seeds: uniform batches at that LR; the meta-trained
   greedy minibatch controller (MetaTrainer, action_mode minibatch); and, for scale, the same
   roulette fed uniformly random class actions. Reported: final val accuracy and epochs until the
   val accuracy first reaches the target = 95% of the uniform runs' mean final val accuracy.

Everything is mean +- sd over meta seeds (each value the mean over the evaluation seeds), except
the baselines (mean +- sd over the evaluation seeds). Meta seed m trains with RLlib seed m and
task seed 1000 m; evaluation seeds are 1,000,000 + i (never used in meta-training).

    python benchmarks/paper_features.py [--meta-seeds 3] [--episodes 30] [--eval-every 10]
                                        [--mb-episodes 30] [--eval-seeds 3]
    python benchmarks/paper_features.py --quick   # smoke test: 1 seed, 4 episodes, into runs/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results"
MM = dict(mm_coef=0.005, mm_active_fraction=0.5, mm_reference="final")  # paper-mnist-lr
TARGET_FRACTION = 0.95  # feature 2: target = this x the uniform runs' mean final val accuracy


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
    from qan_ray.env import TargetTrainingEnv, rollout
    from qan_ray.evaluate import batches_to_target, eval_seeds
    from qan_ray.records import write_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meta-seeds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=30, help="feature 1: episodes per arm/seed")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--mb-episodes", type=int, default=30, help="feature 2: episodes per seed")
    p.add_argument("--eval-seeds", type=int, default=3)
    p.add_argument("--features", default="1,2", help="which features to run (1, 2 or 1,2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 meta seed, 4 episodes, 1 evaluation seed; writes "
                        "runs/paper_features.* instead of the results")
    args = p.parse_args()
    if args.quick:
        args.meta_seeds, args.episodes, args.mb_episodes, args.eval_every = 1, 4, 4, 2
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
            "## 1. Meta-momentum on vs off: episodes until the greedy controller matches the "
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

    # ---------------- feature 2: mini-batch class selection vs uniform --------------------------
    f2 = None
    if 2 in features:
        mb_base = from_dict(task="digits-mlp", device="cpu", batch_size=128, control_interval=1)
        mb_epoch = TargetTrainingEnv(mb_base).trainer.batches_per_epoch
        grid, mb_lr = uniform_grid(mb_base, args.eval_seeds, mb_epoch, log)
        uni = grid[f"fixed@{mb_lr:g}"]
        uni_acc = statistics.mean(uni["val"])
        target = TARGET_FRACTION * uni_acc
        log(f"feature 2: uniform batches at the best fixed LR {mb_lr:g}: final val acc "
            f"{uni_acc:.4f}; target {target:.4f}")
        # reward val_loss: a training-loss reward is measured on the very batches the action
        # composes, so it pays for skewing them (a one-class batch is easy to fit)
        mb_cfg = mb_base.replace(action_mode="minibatch", lr=mb_lr, reward="val_loss")

        def epochs(recs):
            b = batches_to_target(recs, target)
            return None if b is None else b / mb_epoch

        uni_ep = [epochs(r) for r in uni["recs"]]
        for s, (v, t, e) in enumerate(zip(uni["val"], uni["test"], uni_ep)):
            raw.append({"feature": "minibatch", "arm": "uniform", "kind": "baseline",
                        "eval_seed": eval_seeds(args.eval_seeds)[s], "val_acc": v,
                        "test_acc": t, "epochs_to_target": e})
        # the roulette fed uniformly random class actions (no learning)
        env = TargetTrainingEnv(mb_cfg)
        rnd = []
        for s in eval_seeds(args.eval_seeds):
            rng = random.Random(s)
            recs = rollout(env, lambda obs, info, rng=rng: rng.randrange(10), s)
            rnd.append({"val": recs[-1]["val_accuracy"], "test": env.trainer.evaluate("test")[1],
                        "ep": epochs(recs)})
            raw.append({"feature": "minibatch", "arm": "random classes", "kind": "baseline",
                        "eval_seed": s, "val_acc": rnd[-1]["val"], "test_acc": rnd[-1]["test"],
                        "epochs_to_target": rnd[-1]["ep"]})
        mb_rows = []
        for ms in range(args.meta_seeds):
            def ev(ctrl):
                return greedy_point(ctrl, mb_cfg, args.eval_seeds, target, mb_epoch)

            rows = meta_train(mb_cfg, ms, args.mb_episodes, args.eval_every, ev,
                              lambda r: log(f"[minibatch] seed {r['meta_seed']} ep "
                                            f"{r['episodes']}: greedy val acc {r['val_acc']:.4f}"
                                            f" (uniform {uni_acc:.4f}), epochs to target "
                                            f"{r['epochs_to_target']} ({r['reached']}/"
                                            f"{r['runs']}), meta-train {r['meta_train_s']:.0f}s"))
            mb_rows += rows
            for r in rows:
                raw.append({"feature": "minibatch", "arm": "minibatch controller",
                            "kind": "greedy", **r})
        curves["minibatch controller"] = mb_rows
        finals = [r for r in mb_rows if r["episodes"] == args.mb_episodes]
        n = args.eval_seeds
        md += [
            "## 2. Mini-batch class selection vs uniform batches", "",
            f"digits-mlp at batch 128 ({mb_epoch} mini-batches per epoch, "
            f"{mb_base.epochs_per_episode:g} epochs), one decision per mini-batch, LR fixed at "
            f"{mb_lr:g} = the best fixed LR of the uniform grid at batch 128 (" + ", ".join(
                f"{m} {statistics.mean(g['val']):.4f}" for m, g in grid.items()
                if m.startswith("fixed@")) + "). Target = "
            f"{TARGET_FRACTION:g} x the uniform runs' mean final val acc = {target:.4f}. "
            f"Minibatch controller: {args.mb_episodes} meta-training episodes per meta seed, "
            "reward val_loss, gamma 0.95.", "",
            "| arm | final val acc | test acc | epochs to target (runs reaching it) |",
            "|---|---|---|---|",
            f"| uniform batches @ {mb_lr:g} (sd over eval seeds) | {_ms(uni['val'])} | "
            f"{_ms(uni['test'])} | {_ms(uni_ep, 3)} ({sum(e is not None for e in uni_ep)}/{n}) |",
            f"| roulette, random classes (sd over eval seeds) | {_ms([r['val'] for r in rnd])} | "
            f"{_ms([r['test'] for r in rnd])} | {_ms([r['ep'] for r in rnd], 3)} "
            f"({sum(r['ep'] is not None for r in rnd)}/{n}) |",
            f"| minibatch controller, greedy (sd over meta seeds) | "
            f"{_ms([r['val_acc'] for r in finals])} | {_ms([r['test_acc'] for r in finals])} | "
            f"{_ms([r['epochs_to_target'] for r in finals], 3)} "
            f"({sum(r['reached'] for r in finals)}/{n * len(finals)}) |", "",
            "Minibatch controller per meta seed and checkpoint (class actions of evaluation seed "
            "0):", "", "| meta seed | episodes | val acc | epochs to target | actions |",
            "|---|---|---|---|---|"]
        for r in mb_rows:
            e = "-" if r["epochs_to_target"] is None else f"{r['epochs_to_target']:.3f}"
            md.append(f"| {r['meta_seed']} | {r['episodes']} | {r['val_acc']:.4f} | {e} | "
                      f"{r['actions']} |")
        md.append("")
        f2 = {"uni_acc": uni_acc, "uni_ep": uni_ep, "finals": finals, "target": target,
              "lr": mb_lr, "rnd": rnd}
    ray.shutdown()
    wall = time.time() - t0

    # ---------------- verdicts, files ----------------------------------------------------------
    head = ["# QAN's two distinctive features on digits-mlp (benchmarks/paper_features.py)", "",
            "Measured on the embedded digits-mlp task (scikit-learn's 8x8 digits, a 64-unit "
            "MLP), not on MNIST (not on this machine).", "",
            f"- command: `python benchmarks/paper_features.py {' '.join(sys.argv[1:])}`",
            f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
            f"jobs, torch {torch.__version__}, Ray {ray.__version__}; {wall:.0f}s wall in all",
            f"- meta seeds 0..{args.meta_seeds - 1} (RLlib seed m, task seed 1000 m), "
            f"evaluation seeds {eval_seeds(args.eval_seeds)}; feature 1: {args.episodes} "
            f"episodes per arm and seed, greedy evaluation every {args.eval_every}; feature 2: "
            f"{args.mb_episodes} episodes per seed", "",
            "## Verdicts", ""]
    if f1:
        off, on = f1["lines"][0], f1["lines"][1]
        matched_on = [m for m in on[1] if m is not None]
        met = bool(matched_on) and len(matched_on) == len(on[1]) and max(matched_on) <= 20
        faster = _mean([m if m is not None else math.inf for m in on[1]]) < _mean(
            [m if m is not None else math.inf for m in off[1]])
        head.append(
            f"- Feature 1 (with meta-momentum the greedy controller matches the best fixed LR "
            f"within ~20 episodes, the paper's MNIST claim): **{'met' if met else 'not met'}**. "
            f"Episodes to match per meta seed: mm on {on[1]}, mm off {off[1]} (None = not "
            f"within {args.episodes}). Meta-momentum {'is' if faster else 'is not'} faster "
            "than no meta-momentum on this measure.")
    if f2:
        fin = f2["finals"]
        acc_q = _mean([r["val_acc"] for r in fin])
        ep_q = _mean([r["epochs_to_target"] for r in fin])
        ep_u = _mean(f2["uni_ep"])
        met2 = (acc_q is not None and acc_q >= f2["uni_acc"] and ep_q is not None
                and ep_u is not None and ep_q < ep_u
                and all(r["reached"] == r["runs"] for r in fin))
        head.append(
            f"- Feature 2 (the minibatch controller reaches the target in fewer epochs than "
            f"uniform batches without losing final accuracy): **{'met' if met2 else 'not met'}**."
            f" Final val acc {acc_q:.4f} vs uniform {f2['uni_acc']:.4f}; epochs to "
            f"{f2['target']:.4f}: {ep_q if ep_q is None else round(ep_q, 3)} vs "
            f"{ep_u if ep_u is None else round(ep_u, 3)}.")
    head.append("")
    text = "\n".join(head) + "\n" + "\n".join(md)
    _plot(curves, f1, f2, results / f"{stem}.png")
    text += f"\n![greedy accuracy per checkpoint]({stem}.png)\n"
    out = results / f"{stem}.md"
    marker = "<!-- analysis -->"
    if out.exists() and marker in out.read_text():  # keep a hand-written analysis on rerun
        text += "\n" + marker + out.read_text().split(marker, 1)[1]
    out.write_text(text)
    keys = list(dict.fromkeys(k for r in raw for k in r))  # every column, not the first row's
    write_table(results / f"{stem}.parquet",
                [{k: (json.dumps(r[k]) if isinstance(r.get(k), (list, dict)) else r.get(k))
                  for k in keys} for r in raw])
    print(text)


def _plot(curves, f1, f2, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, names, ref, title in (
            (axes[0], [a for a in curves if a.startswith("mm")], f1 and f1["best_acc"],
             "1. meta-momentum (lr mode, batch 32)"),
            (axes[1], ["minibatch controller"], f2 and f2["uni_acc"],
             "2. minibatch controller (batch 128)")):
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
